"""Bad input through the real ``medcurate`` command: a clear ``error: ...`` line on stderr, a
non-zero exit, no traceback, and nothing in the workspace touched."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcurate.config import IngestConfig
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, ingest
from medcurate.workspace import PROVENANCE_FILE

MEDCURATE = Path(sys.executable).with_name("medcurate")


def run_cli(*args: str, workspace: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(MEDCURATE), *args, "--workspace", str(workspace)],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert result.stdout == ""


def _image_folder(root: Path, count: int = 2) -> Path:
    for i in range(count):
        path = root / "cls" / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.full((16, 16, 3), 40 * i + 10, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
    return root


def test_missing_source(tmp_path):
    missing = tmp_path / "no-such-archive"
    result = run_cli("ingest", str(missing), "--name", "x", workspace=tmp_path / "ws")
    assert_clean_error(result, str(missing), "does not exist")
    assert not (tmp_path / "ws" / "collections" / "x").exists()


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("ingest", str(empty), "--name", "x", workspace=tmp_path / "ws")
    assert_clean_error(result, str(empty), "holds no image files")
    assert not (tmp_path / "ws" / "collections" / "x").exists()


def test_metadata_without_the_id_column(tmp_path):
    folder = _image_folder(tmp_path / "images")
    table = tmp_path / "meta.csv"
    table.write_text("file,dx,sex\nimg_0,a,male\nimg_1,b,female\n")
    result = run_cli("ingest", str(folder), "--name", "x", "--metadata", str(table),
                     "--id-column", "image_id", "--label-column", "dx",
                     workspace=tmp_path / "ws")
    assert_clean_error(result, "no column 'image_id'", "--id-column", "file, dx, sex")


def test_invalid_collection_name(tmp_path):
    folder = _image_folder(tmp_path / "images")
    result = run_cli("ingest", str(folder), "--name", "../escape", workspace=tmp_path / "ws")
    assert_clean_error(result, "--name", "invalid name")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "ws").exists()


def test_same_name_twice_without_overwrite_keeps_first(tmp_path, ray_session):
    from medcurate.workspace import Workspace

    workspace = Workspace(str(tmp_path / "ws"))
    first = _image_folder(tmp_path / "first", count=2)
    ingest(IngestConfig(source=str(first), name="col"), workspace)
    folder = Path(workspace.require("collections", "col"))
    before = {name: (folder / name).read_bytes() for name in (MANIFEST_FILE, PROVENANCE_FILE)}

    second = _image_folder(tmp_path / "second", count=3)
    result = run_cli("ingest", str(second), "--name", "col", workspace=tmp_path / "ws")
    assert_clean_error(result, "'col' already exists", "--overwrite")
    after = {name: (folder / name).read_bytes() for name in (MANIFEST_FILE, PROVENANCE_FILE)}
    assert after == before
    assert workspace.list("collections") == ["col"]


def test_failed_overwrite_keeps_earlier_collection(tmp_path, ray_session):
    """--overwrite with a source that yields nothing usable: the error leaves the old one."""
    from medcurate.workspace import Workspace

    workspace = Workspace(str(tmp_path / "ws"))
    ingest(IngestConfig(source=str(_image_folder(tmp_path / "good")), name="col"), workspace)
    folder = Path(workspace.require("collections", "col"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    broken = tmp_path / "broken" / "cls"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(MedcurateError, match="no usable image"):
        ingest(IngestConfig(source=str(broken.parent), name="col", overwrite=True), workspace)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert workspace.list("collections") == ["col"]


@pytest.mark.parametrize("kind, message", [
    ("folder-as-npz", "is a folder"),
    ("folder-as-parquet", "holds no .parquet files"),
    ("garbled-npz", "not a readable .npz"),
    ("empty-npz", "not a readable .npz"),
    ("npy-as-npz", "single array"),
    ("npz-without-images", "'<split>_images'"),
])
def test_wrong_or_broken_sources_are_clear_errors(tmp_path, kind, message):
    """Each of these used to escape as a traceback (OSError, IndexError, BadZipFile, ...)."""
    from medcurate.workspace import Workspace

    folder = _image_folder(tmp_path / "images")
    source, fmt = {
        "folder-as-npz": (folder, "npz"),
        "folder-as-parquet": (folder, "parquet"),
        "garbled-npz": (tmp_path / "garbled.npz", "auto"),
        "empty-npz": (tmp_path / "empty.npz", "auto"),
        "npy-as-npz": (tmp_path / "single.npz", "auto"),
        "npz-without-images": (tmp_path / "other.npz", "auto"),
    }[kind]
    if kind == "garbled-npz":
        source.write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    elif kind == "empty-npz":
        source.write_bytes(b"")
    elif kind == "npy-as-npz":
        with open(source, "wb") as handle:
            np.save(handle, np.zeros((2, 8, 8), np.uint8))
    elif kind == "npz-without-images":
        with open(source, "wb") as handle:
            np.savez(handle, x=np.zeros(3))
    workspace = Workspace(str(tmp_path / "ws"))
    with pytest.raises(MedcurateError, match=message):
        ingest(IngestConfig(source=str(source), name="x", format=fmt), workspace)
    assert workspace.list("collections") == []
