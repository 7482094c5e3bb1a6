"""Checks on published artefacts shared by the object-store and cluster tests."""

from __future__ import annotations

import hashlib

import pyarrow.fs as pafs

from medcurate.workspace import PROVENANCE_FILE, Workspace


def assert_outputs_match_their_hashes(workspace: Workspace, kind: str, key: str) -> dict:
    """Every file of the live version is listed in provenance with its true sha256 and size,
    and nothing else is."""
    folder = workspace.require(kind, key)
    record = workspace.provenance(kind, key)
    files = {info.path[len(folder) + 1:]: info for info in workspace.fs.get_file_info(
        pafs.FileSelector(folder, recursive=True)) if info.type == pafs.FileType.File}
    files.pop(PROVENANCE_FILE)
    assert sorted(record["outputs"]) == sorted(files), (kind, key)
    for name, ref in record["outputs"].items():
        data = workspace.read_bytes(f"{folder}/{name}")
        assert ref["sha256"] == hashlib.sha256(data).hexdigest() and ref["bytes"] == len(data)
    return record
