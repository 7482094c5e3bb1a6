"""The workspace: atomic writes, staged artefacts published whole, key validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medcurate.errors import MedcurateError
from medcurate.workspace import PROVENANCE_FILE, STAGING_DIR, Workspace, validate_key


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _publish(ws: Workspace, key: str, payload: bytes, overwrite: bool = False) -> None:
    with ws.stage("collections", key, overwrite=overwrite) as staging:
        ws.write_bytes(f"{staging}/data.bin", payload)
        ws.write_json(f"{staging}/{PROVENANCE_FILE}", {"payload": payload.decode()})


def _staging_leftovers(ws: Workspace, kind: str = "collections") -> list[str]:
    staging = Path(ws.root) / kind / STAGING_DIR
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def test_write_bytes_is_atomic_and_replaces(workspace):
    target = f"{workspace.root}/collections/a/file.bin"
    workspace.write_bytes(target, b"first version")
    workspace.write_bytes(target, b"second")
    folder = Path(target).parent
    assert Path(target).read_bytes() == b"second"
    assert os.listdir(folder) == ["file.bin"], "a temporary file was left behind"


def test_write_json_round_trip(workspace):
    path = f"{workspace.root}/jobs/j1/record.json"
    workspace.write_json(path, {"b": 2, "a": [1, "x"]})
    assert workspace.read_json(path) == {"a": [1, "x"], "b": 2}
    assert os.listdir(Path(path).parent) == ["record.json"]


def test_stage_publishes_complete_artefact_only_at_exit(workspace):
    with workspace.stage("collections", "c1") as staging:
        workspace.write_bytes(f"{staging}/data.bin", b"payload")
        assert workspace.list("collections") == []  # not visible while being written
        assert not workspace.exists("collections", "c1")
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", {"ok": True})
        assert workspace.list("collections") == []
    assert workspace.list("collections") == ["c1"]
    final = workspace.local_path("collections", "c1")
    assert _tree(final) == {"data.bin": b"payload", PROVENANCE_FILE: (final / PROVENANCE_FILE)
                            .read_bytes()}
    assert workspace.provenance("collections", "c1") == {"ok": True}
    assert _staging_leftovers(workspace) == []


def test_stage_without_provenance_publishes_nothing(workspace):
    with pytest.raises(RuntimeError, match="no provenance"):
        with workspace.stage("collections", "c1") as staging:
            workspace.write_bytes(f"{staging}/data.bin", b"payload")
    assert workspace.list("collections") == []
    assert not workspace.local_path("collections", "c1").exists()
    assert _staging_leftovers(workspace) == []


def test_failure_inside_stage_keeps_earlier_artefact_byte_identical(workspace):
    _publish(workspace, "c1", b"original")
    final = workspace.local_path("collections", "c1")
    before = _tree(final)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with workspace.stage("collections", "c1", overwrite=True) as staging:
            workspace.write_bytes(f"{staging}/data.bin", b"half-written replacement")
            workspace.write_json(f"{staging}/{PROVENANCE_FILE}", {"payload": "new"})
            raise Boom()
    assert _tree(final) == before
    assert workspace.list("collections") == ["c1"]
    assert _staging_leftovers(workspace) == []

    # A failure in a new key leaves no visible artefact at all.
    with pytest.raises(Boom):
        with workspace.stage("collections", "c2") as staging:
            workspace.write_bytes(f"{staging}/data.bin", b"partial")
            raise Boom()
    assert workspace.list("collections") == ["c1"]
    assert not workspace.local_path("collections", "c2").exists()


def test_overwrite_replaces_whole_artefact(workspace):
    _publish(workspace, "c1", b"original")
    with workspace.stage("collections", "c1", overwrite=True) as staging:
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", {"payload": "replaced"})
    final = workspace.local_path("collections", "c1")
    assert sorted(_tree(final)) == [PROVENANCE_FILE]  # no file of the old artefact survives
    assert workspace.provenance("collections", "c1") == {"payload": "replaced"}
    assert _staging_leftovers(workspace) == []


def test_existing_key_without_overwrite_is_refused_before_work(workspace):
    _publish(workspace, "c1", b"original")
    before = _tree(workspace.local_path("collections", "c1"))
    entered = False
    with pytest.raises(MedcurateError, match="already exists"):
        with workspace.stage("collections", "c1"):
            entered = True
    assert not entered
    assert _tree(workspace.local_path("collections", "c1")) == before


@pytest.mark.parametrize("key", ["../x", "a/b", "", ".hidden", "..", "a b", "x\n", "/abs",
                                 "a" * 129])
def test_invalid_keys_are_refused(workspace, key):
    with pytest.raises(MedcurateError, match="invalid name"):
        validate_key(key)
    with pytest.raises(MedcurateError, match="invalid name"):
        workspace.path("collections", key)
    with pytest.raises(MedcurateError, match="invalid name"):
        with workspace.stage("collections", key):
            pass
    assert not Path(workspace.root).exists() or _staging_leftovers(workspace) == []


@pytest.mark.parametrize("key", ["a", "brain-tumor_v1.2", "A" * 128])
def test_valid_keys_are_accepted(key):
    assert validate_key(key) == key


def test_list_shows_only_complete_artefacts_and_ignores_stray_folders(workspace):
    _publish(workspace, "done", b"x")
    base = Path(workspace.root) / "collections"
    (base / "half").mkdir()  # a folder without provenance, e.g. left by a crashed tool
    (base / "half" / "manifest.parquet").write_bytes(b"partial")
    (base / "not a key").mkdir()  # a folder a user made by hand
    (base / "not a key" / PROVENANCE_FILE).write_text("{}")
    assert workspace.list("collections") == ["done"]
    assert workspace.list("selections") == []
    with pytest.raises(MedcurateError, match=r"known: done"):
        workspace.require("collections", "half")
