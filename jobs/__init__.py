"""Ray job entry points: ``python -m jobs.run KIND ...`` runs one medcurate command."""
