"""``python -m medcurate``: the library's commands (ingest, embed, select, ..., gc). The
``medcurate`` console script (``service.cli:main``) adds serve, submit and jobs: they belong to
the service, which the library does not import."""

from medcurate.cli import main

main()
