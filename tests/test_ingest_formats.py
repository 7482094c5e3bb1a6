"""Ingest of archives generated here: DICOM series, corrupt files, CSV manifests, WebDataset
shards and Parquet files of image bytes. Every archive is written by the test, so each count,
label, header field and pixel is known in advance."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medcurate.config import IngestConfig
from medcurate.errors import MedcurateError
from medcurate.ingest import REJECTS_FILE, ingest, read_manifest
from medcurate.ingest import dicom as mdicom
from medcurate.ingest.decode import load_image


def _rejects(workspace, name: str):
    return workspace.read_table(f"{workspace.path('collections', name)}/{REJECTS_FILE}").to_pandas()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _pixels(seed: int, shape=(24, 20, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# -- DICOM --------------------------------------------------------------------------------------
SLOPE, INTERCEPT = 2.0, -1024.0
OWN_WINDOW = (40.0, 400.0)  # soft tissue: HU -160 .. 240


def _stored(hu: float) -> int:
    return int((hu - INTERCEPT) / SLOPE)


def _hu_image(seed: int) -> np.ndarray:
    """16x16 HU values with fixed probes in the first row: -1000, 40 (centre), 1000, 0."""
    stored = np.random.default_rng(seed).integers(_stored(-1000), _stored(1500), size=(16, 16))
    stored[0, :4] = [_stored(-1000), _stored(40), _stored(1000), _stored(0)]
    return stored.astype(np.int16)


def _write_dicom(path: Path, stored: np.ndarray | None, *, sex: str, age: str, body_part: str,
                 view: str, photometric: str = "MONOCHROME2", window=None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientSex, ds.PatientAge = sex, age
    ds.Manufacturer, ds.InstitutionName = "ACME Medical", "General Hospital"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CT", body_part, view
    if stored is not None:
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PixelData = stored.astype("<i2").tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory):
    """head/ (3 slices, own window), chest/ (2 slices, one MONOCHROME1, one without window),
    plus a header-only file without pixel data."""
    root = tmp_path_factory.mktemp("dicom") / "series"
    files = {}
    for i in range(3):
        path = root / "head" / f"slice_{i:03d}.dcm"
        files[path] = dict(stored=_hu_image(i), sex="F", age=f"0{40 + i}Y", body_part="HEAD",
                           view="AX", window=OWN_WINDOW, photometric="MONOCHROME2")
    files[root / "chest" / "slice_000.dcm"] = dict(
        stored=_hu_image(10), sex="M", age="067Y", body_part="CHEST", view="PA", window=None,
        photometric="MONOCHROME2")
    files[root / "chest" / "slice_001.dcm"] = dict(
        stored=_hu_image(11), sex="M", age="067Y", body_part="CHEST", view="AP",
        window=OWN_WINDOW, photometric="MONOCHROME1")
    for path, spec in files.items():
        _write_dicom(path, **spec)
    no_pixels = root / "chest" / "header_only.dcm"
    _write_dicom(no_pixels, None, sex="M", age="067Y", body_part="CHEST", view="PA")
    return root, files, no_pixels


@pytest.fixture(scope="module")
def dicom_ingested(dicom_series, ray_session, tmp_path_factory):
    from medcurate.workspace import Workspace

    root, _, _ = dicom_series
    workspace = Workspace(str(tmp_path_factory.mktemp("dicom-ws") / "ws"))
    summary = ingest(IngestConfig(source=str(root), name="series"), workspace)
    override = ingest(IngestConfig(source=str(root), name="override", window="0,200"), workspace)
    return workspace, summary, override


def test_dicom_keeps_header_fields_bit_depth_and_labels(dicom_series, dicom_ingested):
    root, files, _ = dicom_series
    workspace, summary, _ = dicom_ingested
    assert summary["format"] == "dicom"
    assert summary["ingested"] == 5 and summary["classes"] == {"chest": 2, "head": 3}
    manifest = read_manifest(workspace, "series").to_pandas().set_index("relpath")
    assert len(manifest) == 5
    for path, spec in files.items():
        row = manifest.loc[str(path.relative_to(root))]
        assert row["label"] == path.parent.name
        assert row["bit_depth"] == 16
        assert (row["width"], row["height"], row["channels"]) == (16, 16, 1)
        assert row["PatientSex"] == spec["sex"] and row["PatientAge"] == spec["age"]
        assert row["Manufacturer"] == "ACME Medical"
        assert row["InstitutionName"] == "General Hospital"
        assert row["Modality"] == "CT"
        assert row["BodyPartExamined"] == spec["body_part"]
        assert row["ViewPosition"] == spec["view"]
        if spec["window"] is None:
            assert np.isnan(row["window_center"]) and np.isnan(row["window_width"])
        else:
            assert (row["window_center"], row["window_width"]) == spec["window"]


def test_dicom_modality_values_are_hounsfield_units(dicom_series):
    _, files, _ = dicom_series
    for path, spec in files.items():
        values = mdicom.modality_values(mdicom.read_dataset(path.read_bytes()))
        expected = spec["stored"].astype(np.float64) * SLOPE + INTERCEPT
        assert np.array_equal(values, expected)
        assert list(values[0, :4]) == [-1000.0, 40.0, 1000.0, 0.0]


def test_dicom_load_image_applies_window_and_inverts_monochrome1(dicom_series, dicom_ingested):
    root, files, _ = dicom_series
    workspace, _, _ = dicom_ingested
    manifest = read_manifest(workspace, "series").to_pandas().set_index("relpath")
    for path, spec in files.items():
        row = manifest.loc[str(path.relative_to(root))]
        center = None if np.isnan(row["window_center"]) else row["window_center"]
        width = None if np.isnan(row["window_width"]) else row["window_width"]
        image = load_image(row["uri"], None, center, width)
        assert image.dtype == np.float32 and image.shape == (16, 16)
        assert image.min() >= 0.0 and image.max() <= 1.0
        hu = spec["stored"].astype(np.float64) * SLOPE + INTERCEPT
        if spec["window"] is None:  # no window: the image's own full range
            expected = (hu - hu.min()) / (hu.max() - hu.min())
        else:
            low = OWN_WINDOW[0] - OWN_WINDOW[1] / 2
            expected = np.clip((hu - low) / OWN_WINDOW[1], 0, 1)
            probes = [0.0, 0.5, 1.0]  # below the window, its centre, above it
            if spec["photometric"] == "MONOCHROME1":
                probes = [1.0 - p for p in probes]
            assert image[0, :3] == pytest.approx(probes, abs=1e-6)
        if spec["photometric"] == "MONOCHROME1":
            expected = 1.0 - expected
        assert np.allclose(image, expected, atol=1e-6)


def test_dicom_window_option_overrides_files_own(dicom_series, dicom_ingested):
    root, files, _ = dicom_series
    workspace, _, override = dicom_ingested
    assert override["ingested"] == 5
    manifest = read_manifest(workspace, "override").to_pandas().set_index("relpath")
    assert set(manifest["window_center"]) == {0.0} and set(manifest["window_width"]) == {200.0}
    for path, spec in files.items():
        row = manifest.loc[str(path.relative_to(root))]
        image = load_image(row["uri"], None, row["window_center"], row["window_width"])
        # window 0,200 spans HU -100..100: -1000 -> 0, 40 -> 0.7, 1000 -> 1, 0 -> 0.5
        probes = np.array([0.0, 0.7, 1.0, 0.5])
        if spec["photometric"] == "MONOCHROME1":
            probes = 1.0 - probes
        assert image[0, :4] == pytest.approx(probes, abs=1e-6)


def test_dicom_without_pixel_data_is_rejected(dicom_series, dicom_ingested):
    _, _, no_pixels = dicom_series
    workspace, summary, _ = dicom_ingested
    rejects = _rejects(workspace, "series")
    assert summary["rejected"] == 1 and len(rejects) == 1
    assert rejects.loc[0, "uri"] == str(no_pixels)
    assert "pixel data" in rejects.loc[0, "reason"]
    assert str(no_pixels) not in set(read_manifest(workspace, "series").column("uri").to_pylist())


def test_bad_window_is_a_clear_error(dicom_series, workspace):
    root, _, _ = dicom_series
    for window, message in (("40", "CENTER,WIDTH"), ("40,-5", "positive")):
        with pytest.raises(MedcurateError, match=message):
            ingest(IngestConfig(source=str(root), name="bad", window=window), workspace)
    assert workspace.list("collections") == []


# -- a folder salted with corrupt files ----------------------------------------------------------
def test_corrupt_files_are_rejected_with_reasons(tmp_path, ray_session, workspace):
    root = tmp_path / "salted"
    good = {}
    for n, label in enumerate(("benign", "malignant")):
        for i in range(3):
            path = root / label / f"img_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = _pixels(10 * n + i)
            path.write_bytes(_png(pixels))
            good[path] = pixels
    original = root / "benign" / "img_0.png"
    copy = root / "benign" / "zz_copy_of_img_0.png"
    copy.write_bytes(original.read_bytes())
    good[copy] = good[original]

    bad = {
        root / "benign" / "truncated.jpg": ("truncated", _jpeg(_pixels(7, (64, 64, 3)))[:900]),
        root / "benign" / "notes.png": ("not an image", b"this is a text file, not a PNG\n"),
        root / "malignant" / "empty.png": ("not an image", b""),
        root / "malignant" / "two_channel.png": ("2 channels", _png(_pixels(8, (32, 32, 2)))),
        root / "malignant" / "tiny.png": ("smaller than 8", _png(_pixels(9, (4, 4, 3)))),
    }
    for path, (_, data) in bad.items():
        path.write_bytes(data)

    summary = ingest(IngestConfig(source=str(root), name="salted"), workspace)
    assert summary["ingested"] == len(good) == 7
    assert summary["rejected"] == len(bad) == 5
    assert summary["exact_duplicates"] == 1
    assert summary["classes"] == {"benign": 4, "malignant": 3}

    rejects = _rejects(workspace, "salted").set_index("uri")
    assert set(rejects.index) == {str(p) for p in bad}
    for path, (reason, _) in bad.items():
        assert reason in rejects.loc[str(path), "reason"], rejects.loc[str(path), "reason"]

    manifest = read_manifest(workspace, "salted").to_pandas().set_index("uri")
    assert set(manifest.index) == {str(p) for p in good}
    assert manifest.loc[str(copy), "duplicate_of"] == manifest.loc[str(original), "id"]
    assert manifest.loc[str(copy), "id"] != manifest.loc[str(original), "id"]
    assert manifest.drop(index=str(copy))["duplicate_of"].isna().all()
    for path, pixels in good.items():
        assert np.array_equal(load_image(str(path)), pixels)


def test_folder_of_only_corrupt_files_is_an_error_and_publishes_nothing(tmp_path, ray_session,
                                                                       workspace):
    root = tmp_path / "bad"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"not a png")
    (root / "a" / "y.jpg").write_bytes(b"")
    with pytest.raises(MedcurateError, match="no usable image"):
        ingest(IngestConfig(source=str(root), name="bad"), workspace)
    assert workspace.list("collections") == []


def test_unlabeled_images_are_rejects_unless_allowed(tmp_path, ray_session, workspace):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "a.png").write_bytes(_png(_pixels(1)))
    (root / "cls").mkdir()
    (root / "cls" / "b.png").write_bytes(_png(_pixels(2)))
    summary = ingest(IngestConfig(source=str(root), name="labeled"), workspace)
    assert (summary["ingested"], summary["rejected"]) == (1, 1)
    assert "no label" in _rejects(workspace, "labeled").loc[0, "reason"]
    summary = ingest(IngestConfig(source=str(root), name="all", unlabeled=True), workspace)
    assert (summary["ingested"], summary["rejected"]) == (2, 0)


# -- CSV manifest of paths ------------------------------------------------------------------------
def test_csv_manifest_of_relative_paths(tmp_path, ray_session, workspace):
    root = tmp_path / "archive"
    (root / "imgs").mkdir(parents=True)
    expected = {}
    lines = ["path,diagnosis,scanner,split"]
    for i in range(6):
        pixels = _pixels(100 + i, (20, 30) if i % 2 else (20, 30, 3))
        rel = f"imgs/case_{i}.png"
        (root / rel).write_bytes(_png(pixels))
        label, scanner, split = ("tumour" if i < 2 else "normal"), f"scanner-{i % 3}", \
            ("train" if i < 4 else "test")
        expected[rel] = (label, scanner, split, pixels)
        lines.append(f"{rel},{label},{scanner},{split}")
    absolute = tmp_path / "elsewhere.png"  # one absolute path, outside the table's folder
    absolute.write_bytes(_png(_pixels(200)))
    expected[str(absolute)] = ("normal", "scanner-9", "val", _pixels(200))
    lines.append(f"{absolute},normal,scanner-9,validation")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")

    summary = ingest(IngestConfig(source=str(root / "manifest.csv"), name="csv",
                                  label_column="diagnosis", split_column="split"), workspace)
    assert summary["format"] == "csv"
    assert summary["ingested"] == 7 and summary["rejected"] == 0
    assert summary["classes"] == {"normal": 5, "tumour": 2}
    assert summary["splits"] == {"test": 2, "train": 4, "val": 1}
    manifest = read_manifest(workspace, "csv").to_pandas().set_index("relpath")
    assert set(manifest.index) == set(expected)
    assert "scanner" in manifest.columns
    for rel, (label, scanner, split, pixels) in expected.items():
        row = manifest.loc[rel]
        assert (row["label"], row["scanner"], row["split"]) == (label, scanner, split)
        assert Path(row["uri"]) == (Path(rel) if rel.startswith("/") else root / rel)
        assert pd.isna(row["member"])
        assert np.array_equal(load_image(row["uri"]), pixels)


def test_csv_manifest_missing_file_is_a_reject(tmp_path, ray_session, workspace):
    root = tmp_path / "archive"
    root.mkdir()
    (root / "a.png").write_bytes(_png(_pixels(1)))
    (root / "m.csv").write_text("path,label\na.png,x\nmissing.png,y\n,z\n")
    summary = ingest(IngestConfig(source=str(root / "m.csv"), name="m"), workspace)
    assert (summary["ingested"], summary["rejected"]) == (1, 2)
    rejects = _rejects(workspace, "m").set_index("uri")
    assert "cannot read" in rejects.loc[str(root / "missing.png"), "reason"]
    assert any("empty 'path' cell" in r for r in rejects["reason"])


# -- WebDataset tar shards ----------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path, ray_session, workspace):
    root = tmp_path / "shards"
    root.mkdir()
    expected = {}
    # train shard: the first sample has only a .cls, later ones a .json with label and metadata
    with tarfile.open(root / "train-000000.tar", "w") as tar:
        for i in range(4):
            key, pixels = f"sample{i:04d}", _pixels(300 + i)
            _add(tar, f"{key}.png", _png(pixels))
            if i == 0:
                _add(tar, f"{key}.cls", b"cat_a\n")
                meta = {}
            else:
                meta = {"label": "cat_b" if i % 2 else "cat_a", "hospital": f"h{i}", "age": 30 + i}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
            expected[f"{key}.png"] = ("train", "cat_a" if i == 0 else meta["label"], meta, pixels)
    # val shard: .cls and .json together (the .cls wins for the label), plus one JPEG
    with tarfile.open(root / "val-000000.tar", "w") as tar:
        for i in range(3):
            key, pixels = f"v{i}", _pixels(400 + i)
            _add(tar, f"{key}.png", _png(pixels))
            _add(tar, f"{key}.cls", b"cat_b")
            meta = {"hospital": "h9", "age": 50}
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            expected[f"{key}.png"] = ("val", "cat_b", meta, pixels)
        # metadata whose type differs from the other samples', and a .json that is no object
        key, pixels = "v3", _pixels(403)
        _add(tar, f"{key}.png", _png(pixels))
        _add(tar, f"{key}.cls", b"cat_b")
        _add(tar, f"{key}.json", json.dumps({"hospital": "h9", "age": "unknown"}).encode())
        expected[f"{key}.png"] = ("val", "cat_b", {"hospital": "h9", "age": "unknown"}, pixels)
        key, pixels = "v4", _pixels(404)
        _add(tar, f"{key}.png", _png(pixels))
        _add(tar, f"{key}.cls", b"cat_a")
        _add(tar, f"{key}.json", b"[1, 2]")
        expected[f"{key}.png"] = ("val", "cat_a", {}, pixels)
        _add(tar, "v9.jpg", _jpeg(_pixels(499)))
        _add(tar, "v9.cls", b"cat_a")
        _add(tar, "orphan.txt", b"no image here")

    summary = ingest(IngestConfig(source=str(root), name="wds"), workspace)
    assert summary["format"] == "webdataset"
    assert summary["ingested"] == len(expected) + 1 == 10
    assert summary["splits"] == {"train": 4, "val": 6}
    assert summary["classes"] == {"cat_a": 4, "cat_b": 6}
    assert summary["rejected"] == 1
    assert "no image member" in _rejects(workspace, "wds").loc[0, "reason"]

    manifest = read_manifest(workspace, "wds").to_pandas().set_index("member")
    assert manifest.loc["v9.jpg", "label"] == "cat_a"
    assert (manifest.loc["v9.jpg", "width"], manifest.loc["v9.jpg", "height"]) == (20, 24)
    for column in ("hospital", "age"):
        assert column in manifest.columns, f".json metadata {column!r} lost"
    for member, (split, label, meta, pixels) in expected.items():
        row = manifest.loc[member]
        assert (row["split"], row["label"]) == (split, label)
        if meta:  # ages mix numbers and text across samples, so the column holds text
            assert (row["hospital"], row["age"]) == (meta["hospital"], str(meta["age"]))
        else:
            assert pd.isna(row["hospital"]) and pd.isna(row["age"])
        assert np.array_equal(load_image(row["uri"], member), pixels)


# -- Parquet files of encoded image bytes ---------------------------------------------------------
def test_parquet_image_bytes(tmp_path, ray_session, workspace):
    root = tmp_path / "pq"
    root.mkdir()
    expected = {}
    for filename, split, count in (("train.parquet", "train", 5),
                                   ("test-00000-of-00001.parquet", "test", 3)):
        images, labels, ages = [], [], []
        for i in range(count):
            pixels = _pixels(500 + 10 * count + i, (16, 18) if i % 2 else (16, 18, 3))
            images.append(_png(pixels))
            labels.append(i % 2)
            ages.append(20 + i)
            expected[(filename, i)] = (split, str(i % 2), 20 + i, pixels)
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()),
                                 "label": pa.array(labels, pa.int64()),
                                 "patient_age": pa.array(ages, pa.int32())}), root / filename)

    summary = ingest(IngestConfig(source=str(root), name="pq"), workspace)
    assert summary["format"] == "parquet"
    assert summary["ingested"] == 8 and summary["rejected"] == 0
    assert summary["classes"] == {"0": 5, "1": 3}
    assert summary["splits"] == {"test": 3, "train": 5}
    manifest = read_manifest(workspace, "pq").to_pandas()
    assert "patient_age" in manifest.columns and "image" not in manifest.columns
    assert manifest["id"].is_unique
    for row in manifest.itertuples():
        column, index = row.member.rsplit("/", 1)
        assert column == "image"
        split, label, age, pixels = expected[(Path(row.uri).name, int(index))]
        assert (row.split, row.label, row.patient_age) == (split, label, age)
        assert np.array_equal(load_image(row.uri, row.member), pixels)
