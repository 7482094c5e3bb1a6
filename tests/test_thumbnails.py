"""Thumbnails of a collection's own files: every format ingest reads (PNG, JPEG, 16-bit, DICOM
with its window, a MedMNIST .npz member), shown as they look, and an unreadable image giving
None instead of failing the report."""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from medcurate.demo import make_demo_archive
from medcurate.thumbnails import thumbnail_uris

from test_ingest_formats import OWN_WINDOW, _hu_image, _write_dicom

PREFIX = "data:image/jpeg;base64,"


def _rows(uris: list[str], members: list[str | None] | None = None, **window) -> pa.Table:
    return pa.table({"uri": uris, "member": pa.array(members or [None] * len(uris), pa.string()),
                     **window})


def _decoded(uri: str) -> np.ndarray:
    assert uri.startswith(PREFIX)
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(PREFIX):])))
    assert image.format == "JPEG" and max(image.size) <= 64
    return np.asarray(image.convert("L"), dtype=np.float32)


def test_generated_files_become_thumbnails_and_broken_ones_none(tmp_path):
    demo = make_demo_archive(tmp_path / "demo", per_class=10, size=128)
    tagged, plain = demo / "disc" / "disc_0000.png", demo / "disc" / "disc_0005.png"
    # A 12-bit X-ray-like ramp in a 16-bit PNG: shown stretched, dark left, bright right.
    ramp = np.tile(np.linspace(0, 4095, 200), (100, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    _write_dicom(tmp_path / "ct.dcm", _hu_image(0), sex="F", age="040Y", body_part="HEAD",
                 view="AX", window=OWN_WINDOW)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    uris = thumbnail_uris(_rows(
        [str(p) for p in (tagged, plain, tmp_path / "ramp16.png", tmp_path / "ct.dcm",
                          tmp_path / "broken.png", tmp_path / "missing.png")],
        window_center=[None, None, None, OWN_WINDOW[0], None, None],
        window_width=[None, None, None, OWN_WINDOW[1], None, None]))
    assert uris[4] is None and uris[5] is None
    corner = _decoded(uris[0])[:10, :10].mean(), _decoded(uris[1])[:10, :10].mean()
    assert corner[0] > 200 > 100 > corner[1]  # the burned-in tag of the demo's site_b
    ramp_thumb = _decoded(uris[2])
    assert ramp_thumb.shape == (32, 64)  # aspect kept, longest side 64
    assert ramp_thumb[:, :4].mean() < 20 and ramp_thumb[:, -4:].mean() > 235
    ct = _decoded(uris[3])
    assert ct.shape == (16, 16) and ct.std() > 20  # windowed, not flat


def test_real_files_become_thumbnails(shared_data):
    ham = sorted((shared_data / "ham10000" / "images").glob("*.jpg"))[:3]
    mri = sorted((shared_data / "brain-tumor-mri" / "Training" / "glioma").glob("*.jpg"))[:2]
    npz = str(shared_data / "pneumoniamnist" / "pneumoniamnist.npz")
    uris = thumbnail_uris(_rows([*map(str, ham + mri), npz, npz],
                                [None] * 5 + ["train/0", "test/999999"]))
    assert uris[-1] is None  # no such member
    for uri in uris[:-1]:
        thumb = _decoded(uri)
        assert thumb.std() > 5
        assert len(uri) < 4_000  # the page's budget assumes about 1.5 KB each
    assert _decoded(uris[5]).shape == (28, 28)  # MedMNIST is smaller than 64: not enlarged


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_flat_images_do_not_divide_by_zero(dtype):
    from medcurate.thumbnails import display_pixels

    shown = display_pixels(np.full((8, 8), 7, dtype=dtype))
    assert shown.dtype == np.uint8 and np.isfinite(shown).all()


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_thumbnails_of_images_on_an_object_store(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket()
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 250, 2, dtype=np.uint8), (80, 1))).save(buffer, "PNG")
    s3_server.boto3_client().put_object(Bucket=bucket, Key="archive/ramp.png",
                                        Body=buffer.getvalue())
    uris = thumbnail_uris(_rows([f"s3://{bucket}/archive/ramp.png",
                                 f"s3://{bucket}/archive/missing.png"]))
    assert _decoded(uris[0]).shape == (41, 64) and uris[1] is None
