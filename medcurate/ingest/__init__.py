"""Ingest archives of medical images into workspace collections."""

from medcurate.ingest.pipeline import MANIFEST_FILE, REJECTS_FILE, ingest, read_manifest

__all__ = ["MANIFEST_FILE", "REJECTS_FILE", "ingest", "read_manifest"]
