"""Path confinement and size bombs: what a request (or an archive it names) may make the
service read.

Unit tests of ``service.paths.PathPolicy`` and ``medcurate.confine`` on attack strings; the
ingest listing confined to data roots (manifests that list paths out, symlinks out of a source
folder); ``.npz``, ``.tar.gz``, Parquet and DICOM bombs refused from their headers; the CLI's
opt-in ``--confine-to``; and, over real HTTP against one ``medcurate serve`` for the module,
the attacks the service must answer without reading anything outside its data roots.
"""

from __future__ import annotations

import io
import json
import os
import resource
import secrets
import struct
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from medcurate.confine import OUTSIDE, parse_uri
from medcurate.config import (CurateConfig, EmbedConfig, IngestConfig, OptidelConfig,
                              ScoreConfig)
from medcurate.errors import MedcurateError
from medcurate.ingest import REJECTS_FILE, decode
from medcurate.ingest import dicom as mdicom
from medcurate.ingest.decode import ImageError
from medcurate.ingest.sources import list_source
from medcurate.workspace import Workspace
from service.jobs import job_params
from service.paths import PathPolicy, PathRefused, refuse_relative
from service_process import MEDCURATE, ServiceProcess

TOKEN = secrets.token_hex(16)
GIB = 1 << 30


def _png(seed: int, shape=(16, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tree(tmp_path):
    """``data/`` (the root) and ``outside/`` beside it, holding a valid image and a would-be
    SAM checkpoint: were either read, a test would see it."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "real").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(99))
    (outside / "sam_vit_b_secret.pth").write_bytes(b"weights")
    (data / "real" / "sam_vit_b_01.pth").write_bytes(b"weights")
    (data / "real" / "mae.pt").write_bytes(b"checkpoint")
    return data, outside


def _policy(data: Path) -> PathPolicy:
    return PathPolicy([str(data), "s3://bucket/ws"])


# -- URIs --------------------------------------------------------------------------------------
URI_ATTACKS = {
    "s3://bucket/ws/x.csv?endpoint_override=attacker:80&scheme=http": "query string",
    "s3://bucket/ws/x.csv?": "query string",
    "s3://bucket/ws/%2e%2e/other/x": "percent-encode",
    "s3://bucket/ws/%2E%2E/other/x": "percent-encode",
    "s3://bucket/ws/..%2fother": "percent-encode",
    "s3://bucket/ws%2f..%2fother": "percent-encode",
    "s3://bucket/ws/%252e%252e/x": "percent-encode",
    "s3://bucket/ws/x%": "percent-encoding",
    "s3://bucket/ws/x#frag": "fragment",
    "s3://user:pass@bucket/ws/x": "credentials",
    "s3://AKIA@bucket/ws/x": "credentials",
    "s3://bucket/ws/../other/x": "'..'",
    "s3://bucket/ws/./x": "'.'",
    "s3://bucket/ws/a\\..\\..\\x": "backslash",
    "s3://bucket/ws/a b": "spaces",
    "s3://bucket/ws/a\nb": "control",
    "s3://bucket:80/ws/x": OUTSIDE,
    "s3://bucket/wsx/y": OUTSIDE,
    "s3://other/ws/x": OUTSIDE,
    "gs://bucket/ws/x": OUTSIDE,
    "http://169.254.169.254/latest/meta-data": OUTSIDE,
    "s3:///ws/x": "not a valid URI",
}


@pytest.mark.parametrize("uri, reason", URI_ATTACKS.items())
def test_uri_attacks_are_refused_without_naming_the_roots(tree, uri, reason):
    data, _ = tree
    with pytest.raises(PathRefused) as refused:
        _policy(data).resolve("source", uri)
    message = str(refused.value)
    assert message.startswith("source: refused: ") and reason in message
    assert "data roots" in message
    assert str(data) not in message and "s3://bucket/ws" not in message  # no listing


def test_uris_inside_a_root_come_back_normalised(tree):
    data, _ = tree
    policy = _policy(data)
    assert policy.resolve("f", "s3://bucket/ws/a//b/") == "s3://bucket/ws/a/b"
    assert policy.resolve("f", "S3://bucket/ws/x") == "s3://bucket/ws/x"
    assert policy.resolve("f", "s3://bucket/ws/a%20b.png") == "s3://bucket/ws/a%20b.png"
    assert policy.resolve("f", "s3://bucket/ws") == "s3://bucket/ws"
    # an operator's root may carry a query (an endpoint); what it resolves keeps it
    configured = PathPolicy(["s3://b2/k?endpoint_override=127.0.0.1:9000&scheme=http"])
    assert configured.resolve("f", "s3://b2/k/x") == \
        "s3://b2/k/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert configured.resolve("f", "s3://b2/k/x?endpoint_override=127.0.0.1:9000&scheme=http"
                              ) == "s3://b2/k/x?endpoint_override=127.0.0.1:9000&scheme=http"
    for other in ("s3://b2/k/x?endpoint_override=evil:80&scheme=http",
                  "s3://b2/other?endpoint_override=127.0.0.1:9000&scheme=http"):
        with pytest.raises(PathRefused, match="query string"):
            configured.resolve("f", other)
    assert parse_uri("s3://bucket/a/%41").key == ("a", "A")


# -- local paths, file: URIs and relative paths ---------------------------------------------------
def test_local_paths_resolve_and_file_uris_must_be_absolute(tree):
    data, outside = tree
    policy = _policy(data)
    (data / "link").symlink_to(data / "real")
    (data / "out").symlink_to(outside)
    assert policy.resolve("f", str(data / "link" / "mae.pt")) == str(data / "real" / "mae.pt")
    assert policy.resolve("f", f"file://{data}/real/mae.pt") == str(data / "real" / "mae.pt")
    assert policy.resolve("f", f"file://localhost{data}/real") == str(data / "real")
    for value in (f"file://{outside}/secret.png", str(data / "out" / "secret.png"),
                  str(data / ".." / "outside"), "file://relative/x", "file:relative/x",
                  "relative/x", "~/x", f"{data}/\0x", "/\ud800", f"file://{data}/%2e%2e/x",
                  f"file://{data}/x?y=1"):
        with pytest.raises(PathRefused) as refused:
            policy.resolve("f", value)
        assert str(data) not in str(refused.value).replace(value, "")


@pytest.mark.parametrize("config_cls, params", [
    (IngestConfig, {"source": "file://relative/x", "name": "x"}),
    (IngestConfig, {"source": "file:relative/x", "name": "x"}),
    (IngestConfig, {"source": "/abs", "metadata": "meta.csv", "name": "x"}),
    (OptidelConfig, {"embedding_run": "r", "extractor": "sam:sam_vit_b.pth"}),
    (OptidelConfig, {"embedding_run": "r", "extractor": "sam:~nobody/sam_vit_b.pth"}),
    (OptidelConfig, {"embedding_run": "r", "extractor": "sam:file://relative/sam_vit_b.pth"}),
    (EmbedConfig, {"collection": "c", "model": "mae:models/x/model.pt"}),
    (CurateConfig, {"model": "mae:file://host/model.pt"}),
])
def test_relative_paths_are_refused_before_validation(config_cls, params):
    with pytest.raises(MedcurateError, match="relative path"):
        refuse_relative(config_cls, params)


def test_absolute_paths_and_uris_pass_the_relative_check():
    refuse_relative(OptidelConfig, {"embedding_run": "r", "extractor": "grid"})
    refuse_relative(OptidelConfig, {"embedding_run": "r", "extractor": "sam:/abs/sam_vit_b.pth"})
    refuse_relative(EmbedConfig, {"collection": "c", "model": "mae:s3://bucket/ws/m.pt"})
    refuse_relative(IngestConfig, {"source": "s3://bucket/x", "name": "x"})


# -- every path-like field through one function, the resolved path in the config ------------------
def _optidel(extractor: str) -> OptidelConfig:
    return OptidelConfig(embedding_run="r", fraction=0.1, extractor=extractor)


def test_sam_extractor_is_confined_and_carries_the_resolved_path(tree):
    data, outside = tree
    policy = _policy(data)
    (data / "sam_vit_b_link.pth").symlink_to(data / "real" / "sam_vit_b_01.pth")
    (data / "sam_vit_b_out.pth").symlink_to(outside / "sam_vit_b_secret.pth")
    confined = policy.confine(_optidel(f"sam:{data}/sam_vit_b_link.pth"))
    assert confined.extractor == f"sam:{data}/real/sam_vit_b_01.pth"
    assert policy.confine(_optidel("grid")).extractor == "grid"
    messages = set()
    for path in ("/etc/passwd", "/nonexistent-dir-xyz/sam_vit_b.pth",
                 str(outside / "sam_vit_b_secret.pth"), str(data / "sam_vit_b_out.pth"),
                 str(data / ".." / "outside" / "sam_vit_b_secret.pth")):
        with pytest.raises(PathRefused) as refused:
            policy.confine(_optidel(f"sam:{path}"))
        messages.add(str(refused.value))
    # existing or not, file or link: one message, so no answer tells what exists
    assert messages == {"extractor: refused: the path is outside the data roots this service "
                        "may read"}
    with pytest.raises(PathRefused):  # any KIND:PATH names a file, whatever the kind
        policy.confine(_optidel("grid:/etc/passwd"))


def test_mae_specs_carry_the_resolved_path(tree):
    data, outside = tree
    policy = _policy(data)
    (data / "latest.pt").symlink_to(data / "real" / "mae.pt")
    (data / "escape.pt").symlink_to(outside / "secret.png")
    embed = policy.confine(EmbedConfig(collection="c", model=f"mae:{data}/latest.pt"))
    assert embed.model == f"mae:{data}/real/mae.pt"
    assert job_params(embed)["model"] == f"mae:{data}/real/mae.pt"  # what the job gets
    curate = policy.confine(CurateConfig(source=str(data), model=f"mae:{data}/latest.pt"))
    assert curate.model == f"mae:{data}/real/mae.pt"
    assert policy.confine(EmbedConfig(collection="c", model="mae:s3://bucket/ws//m.pt")
                          ).model == "mae:s3://bucket/ws/m.pt"
    for spec in (f"mae:{data}/escape.pt", "mae:s3://bucket/ws/m.pt?endpoint_override=x:1",
                 "mae:/etc/passwd"):
        with pytest.raises(PathRefused, match="model: refused"):
            policy.confine(EmbedConfig(collection="c", model=spec))


def test_zoo_entries_are_confined(tree):
    data, outside = tree
    (data / "escape.pt").symlink_to(outside / "secret.png")
    zoo = data / "zoo.yaml"
    zoo.write_text("models:\n  - name: a\n    model: mobilenetv2-imagenet\n"
                   "  - name: b\n    model: mae:escape.pt\n")
    with pytest.raises(PathRefused, match=r"zoo\[b\]\.model: refused"):
        _policy(data).confine(ScoreConfig(target="t", zoo=str(zoo)))


def test_ingest_configs_get_the_roots_whatever_the_request_said(tree):
    data, _ = tree
    policy = _policy(data)
    for config in (IngestConfig(source=str(data), name="x", confine_to=["/"]),
                   CurateConfig(source=str(data))):
        confined = policy.confine(config)
        assert confined.confine_to == [str(data), "s3://bucket/ws"]
        assert job_params(confined)["confine_to"] == [str(data), "s3://bucket/ws"]
    assert not hasattr(policy.confine(EmbedConfig(collection="c")), "confine_to")


def test_a_symlink_loop_is_refused_like_any_path_outside(tree):
    data, outside = tree
    (outside / "loop1").symlink_to(outside / "loop2")
    (outside / "loop2").symlink_to(outside / "loop1")
    with pytest.raises(PathRefused, match="outside the data roots"):
        _policy(data).confine(_optidel(f"sam:{outside}/loop1/sam_vit_b.pth"))
    with pytest.raises(PathRefused, match="outside the data roots"):
        _policy(data).confine(IngestConfig(source=f"{outside}/loop1/x", name="x"))


# -- archives listing paths out of the roots ----------------------------------------------------
def _manifest_archive(data: Path, outside: Path) -> Path:
    archive = data / "archive"
    (archive / "imgs").mkdir(parents=True)
    (archive / "imgs" / "good.png").write_bytes(_png(1))
    (archive / "imgs" / "link.png").symlink_to(outside / "secret.png")
    rows = ["path,label", "imgs/good.png,a", "/etc/hostname,a", "../../outside/secret.png,a",
            f"{outside}/secret.png,b", "imgs/link.png,b", "file:///etc/passwd,b",
            "s3://bucket/ws/x.png?endpoint_override=127.0.0.1:9&scheme=http,b",
            "s3://bucket/ws/%2e%2e/x.png,b", "/dev/zero,b", "imgs/missing.png,a"]
    (archive / "table.csv").write_text("\n".join(rows) + "\n")
    return archive / "table.csv"


def _rejects(workspace: Path, name: str) -> list[dict]:
    return pq.read_table(Workspace(str(workspace)).path("collections", name, REJECTS_FILE)
                         ).to_pylist()


def _no_leak(rejects: list[dict], outside: Path) -> None:
    text = json.dumps(rejects)
    for secret in ("secret", str(outside), "/etc/", "hostname", "passwd", "/dev/zero",
                   "endpoint_override", "127.0.0.1"):
        assert secret not in text, (secret, text)


def test_a_confined_manifest_rejects_every_path_out_without_naming_it(tree):
    data, outside = tree
    table = _manifest_archive(data, outside)
    config = IngestConfig(source=str(table), name="x", confine_to=[str(data), "s3://bucket/ws"])
    listing = list_source(config)
    assert listing.items.column("uri").to_pylist() == [
        str(data / "archive" / "imgs" / "good.png"),
        str(data / "archive" / "imgs" / "missing.png")]  # inside: the probe says it is missing
    reasons = {r["uri"].rsplit("#", 1)[1]: r["reason"] for r in listing.rejects}
    refused = f"'path' cell refused: {OUTSIDE}"
    assert reasons == {"row1": refused, "row2": refused, "row3": refused, "row4": refused,
                       "row5": refused, "row6": "'path' cell refused: a URI may not carry a "
                       "query string", "row7": "'path' cell refused: a URI may not "
                       "percent-encode a separator, dot, '%' or control character",
                       "row8": refused}
    _no_leak(listing.rejects, outside)
    # unconfined (the CLI's default) the table is read as it says: here, the outside image too
    loose = list_source(IngestConfig(source=str(table), name="x"))
    assert f"{outside}/secret.png" in loose.items.column("uri").to_pylist()


def test_a_confined_folder_follows_no_link_out(tree):
    data, outside = tree
    folder = data / "folder"
    (folder / "cls_a").mkdir(parents=True)
    (folder / "cls_a" / "good.png").write_bytes(_png(2))
    (folder / "cls_a" / "leak.png").symlink_to(outside / "secret.png")
    (folder / "cls_b").symlink_to(outside)  # a whole folder out
    (folder / "cls_c").symlink_to(data / "real")  # a folder in: followed
    (folder / "loop").symlink_to(folder)  # a loop in: walked once
    (folder / "dangling.png").symlink_to(outside / "nothing-here.png")
    config = IngestConfig(source=str(folder), name="x", unlabeled=True,
                          confine_to=[str(data)])
    listing = list_source(config)
    uris = listing.items.column("uri").to_pylist()
    assert str(folder / "cls_a" / "good.png") in uris
    assert all(uri.startswith(str(data) + "/") for uri in uris)
    assert not any("secret" in uri for uri in uris)
    rejected = {r["uri"]: r["reason"] for r in listing.rejects}
    assert rejected == {str(folder / "cls_a" / "leak.png"): OUTSIDE,
                        str(folder / "cls_b"): OUTSIDE,
                        str(folder / "dangling.png"): OUTSIDE}
    _no_leak(listing.rejects, outside)


def test_a_confined_source_or_metadata_outside_is_refused(tree):
    data, outside = tree
    (outside / "meta.csv").write_text("file,label\n")
    (data / "img").mkdir()
    with pytest.raises(PathRefused, match="source: refused: outside the data roots"):
        list_source(IngestConfig(source=str(outside), name="x", confine_to=[str(data)]))
    with pytest.raises(PathRefused, match="metadata: refused: outside the data roots"):
        list_source(IngestConfig(source=str(data / "img"), name="x", id_column="file",
                                 metadata=str(outside / "meta.csv"), confine_to=[str(data)]))


# -- .npz bombs -----------------------------------------------------------------------------------
def _npz(path: Path, compressed: bool = False, **arrays) -> Path:
    with open(path, "wb") as handle:
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)
    return path


def _claim_size(path: Path, member: str, size: int) -> None:
    """Forge the uncompressed size a zip's local and central headers declare for ``member``."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(member).header_offset
    struct.pack_into("<I", data, local + 22, size)
    central = data.find(b"PK\x01\x02")
    while central != -1:
        length = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46:central + 46 + length] == name:
            struct.pack_into("<I", data, central + 24, size)
        central = data.find(b"PK\x01\x02", central + 4)
    path.write_bytes(bytes(data))


def _npy_claiming(shape: tuple[int, ...], payload: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue() + payload


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_npz_bombs_are_refused_from_their_headers(tmp_path, monkeypatch):
    labels = np.zeros((4, 1), np.uint8)
    claimed = _npz(tmp_path / "claimed.npz", train_images=np.zeros((4, 8, 8), np.uint8),
                   train_labels=labels)
    _claim_size(claimed, "train_images.npy", 3_000_000_000)
    forged = tmp_path / "forged.npz"
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("train_images.npy", _npy_claiming((10 ** 6, 1000), bytes(64)))
        archive.writestr("train_labels.npy", _npy_claiming((4, 1), bytes(4)))
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(huge, "w") as archive:
        archive.writestr("train_images.npy", _npy_claiming((10 ** 7, 1000), bytes(64)))
    before = _max_rss_mib()
    cases = [(claimed, "declares 3,000,000,000 bytes uncompressed, over the limit of "
                       f"{2 * GIB:,} bytes"),
             (forged, "declares an array of 1,000,000,000 bytes in a member of"),
             (huge, "declares an array of 10,000,000,000 bytes, over the limit")]
    for path, message in cases:
        with pytest.raises(MedcurateError, match=message):
            list_source(IngestConfig(source=str(path), name="x"))
        with pytest.raises(ImageError, match="over the limit|truncated or forged"):
            decode.probe(str(path), "train/0")
    # a real zip bomb (32 MiB of zeros in a few KiB) against a lowered limit
    monkeypatch.setenv(decode.MAX_DECOMPRESSED_ENV, str(8 << 20))
    bomb = _npz(tmp_path / "bomb.npz", compressed=True,
                train_images=np.zeros((512, 256, 256), np.uint8), train_labels=np.zeros(
                    (512, 1), np.uint8))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(MedcurateError, match="decompression bomb"):
        list_source(IngestConfig(source=str(bomb), name="x"))
    assert _max_rss_mib() - before < 256  # nothing was decompressed
    ok = _npz(tmp_path / "ok.npz", train_images=np.ones((3, 8, 8), np.uint8),
              train_labels=np.array([[0], [1], [1]]))
    listing = list_source(IngestConfig(source=str(ok), name="ok"))
    assert listing.items.column("label").to_pylist() == ["0", "1", "1"]
    assert decode.fetch(str(ok), "train/2").sum() == 64


# -- .tar.gz: one pass, bounded -------------------------------------------------------------------
def _shard(path: Path, samples: int, extra: list[tuple[str, bytes]] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [item for i in range(samples) for item in
                           ((f"s{i:04d}.png", _png(i, (8, 8))), (f"s{i:04d}.cls", b"a"))] + \
                list(extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_gz_shard_is_streamed_once(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "train-000000.tar.gz", 200)
    opened = []
    real_open = tarfile.open

    def counting_open(*args, **kwargs):
        opened.append(kwargs.get("mode"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    monkeypatch.setattr(decode, "_SHARDS", decode._ShardCache())
    listing = list_source(IngestConfig(source=str(shards), name="w"))
    assert listing.items.num_rows == 200 and opened == ["r|*"]  # the listing: one pass
    started = time.perf_counter()
    for uri, member in zip(listing.items.column("uri").to_pylist(),
                           listing.items.column("member").to_pylist()):
        assert decode.probe(uri, member).width == 8
    assert opened == ["r|*", "r|*"] and decode._SHARDS.passes == 1  # every probe: one pass
    assert time.perf_counter() - started < 30


def test_tar_gz_bombs_are_cut_off(tmp_path, monkeypatch):
    monkeypatch.setenv(decode.MAX_DECOMPRESSED_ENV, str(4 << 20))
    monkeypatch.setattr(decode, "_SHARDS", decode._ShardCache())
    shards = tmp_path / "shards"
    shards.mkdir()
    path = _shard(shards / "train-000000.tar.gz", 3, [("zeros.png", bytes(16 << 20)),
                                                      ("zeros.cls", b"a")])
    assert path.stat().st_size < 1 << 20
    listing = list_source(IngestConfig(source=str(shards), name="w"))
    assert listing.items.num_rows == 3
    assert any("decompresses to over" in r["reason"] for r in listing.rejects)
    with pytest.raises(ImageError, match="decompresses to over"):
        decode.fetch(str(path), "zeros.png")
    monkeypatch.setenv(decode.MAX_DECOMPRESSED_ENV, str(GIB))
    monkeypatch.setenv(decode.MAX_IMAGE_BYTES_ENV, str(1 << 20))
    monkeypatch.setattr(decode, "_SHARDS", decode._ShardCache())
    with pytest.raises(ImageError, match="a tar member of 16,777,216 bytes is over the limit"):
        decode.fetch(str(path), "zeros.png")
    assert decode.probe(str(path), "s0001.png").width == 8


def test_parquet_columns_and_image_files_are_capped(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": pa.array([bytes(3 << 20), b"\1" * (3 << 20)]),
                             "label": ["a", "b"]}), path, compression="zstd")
    assert path.stat().st_size < 1 << 20
    monkeypatch.setenv(decode.MAX_DECOMPRESSED_ENV, str(4 << 20))
    decode._parquet_column.cache_clear()
    with pytest.raises(ImageError, match="decompresses to 6,29"):
        decode.probe(str(path), "image/0")
    # one 512 KiB value that 20,000 rows point to: 10 GB decoded, a dictionary as read
    repeated = tmp_path / "repeated.parquet"
    indices = pa.array(np.r_[0, np.ones(20_000)].astype(np.int32))
    column = pa.DictionaryArray.from_arrays(indices, pa.array([_png(7), bytes(512 << 10)]))
    pq.write_table(pa.table({"image": column}), repeated, compression="zstd",
                   store_schema=False)  # read back, it is plain binary: no dictionary hint
    assert pq.read_schema(repeated).field("image").type == pa.binary()
    before = _max_rss_mib()
    assert decode.probe(str(repeated), "image/0").width == 16
    with pytest.raises(ImageError, match="not an image file"):
        decode.probe(str(repeated), "image/19999")
    assert _max_rss_mib() - before < 256
    big = tmp_path / "big.png"
    big.write_bytes(bytes(2 << 20))
    monkeypatch.setenv(decode.MAX_IMAGE_BYTES_ENV, str(1 << 20))
    with pytest.raises(ImageError, match="a file of 2,097,152 bytes is over the limit"):
        decode.probe(str(big), None)


def test_dicom_pixel_counts_are_capped_like_pillow(tmp_path):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    def dicom(rows: int, columns: int, frames: int | None = None) -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        import pydicom

        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
        if frames:
            ds.NumberOfFrames = frames
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(64)  # far fewer bytes than declared: never decoded
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    limit = Image.MAX_IMAGE_PIXELS
    for rows, columns, frames in ((20_000, 20_000, None), (4096, 4096, 64)):
        with pytest.raises(mdicom.DicomError, match=f"over the limit of {int(limit):,}"):
            mdicom.read_dataset(dicom(rows, columns, frames))
        path = tmp_path / f"bomb-{rows}.dcm"
        path.write_bytes(dicom(rows, columns, frames))
        with pytest.raises(ImageError, match="decompression bomb"):
            decode.probe(str(path), None)
    assert mdicom.read_dataset(dicom(8, 8)).Rows == 8


# -- the CLI's opt-in --confine-to -------------------------------------------------------------
def test_cli_confine_to(tree, tmp_path):
    data, outside = tree
    table = _manifest_archive(data, outside)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([str(MEDCURATE), "ingest", str(table), "--name", "x",
                             "--confine-to", str(data), "--workspace", str(tmp_path / "ws")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["ingested"], summary["rejected"]) == (1, 9)
    assert summary["reject_reasons"][f"'path' cell refused: {OUTSIDE}"] == 6
    rejects = _rejects(tmp_path / "ws", "x")
    _no_leak([r for r in rejects if "missing.png" not in r["uri"]], outside)
    provenance = Workspace(str(tmp_path / "ws")).provenance("collections", "x")
    assert "confine_to" not in provenance["config"]  # the roots are nobody else's business


# -- over real HTTP ------------------------------------------------------------------------------
class Live:
    def __init__(self, url: str, data: Path, outside: Path, workspace: Path):
        self.url, self.data, self.outside, self.workspace = url, data, outside, workspace
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy for 127.0.0.1

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.http.request(method, f"{self.url}{path}", timeout=120,
                                 headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)

    def job(self, kind: str, params: dict, timeout_s: float = 300) -> dict:
        response = self.call("POST", "/v1/jobs", json={"kind": kind, "params": params})
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            view = self.call("GET", f"/v1/jobs/{job_id}").json()
            if view["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                view["logs"] = self.call("GET", f"/v1/jobs/{job_id}/logs").text
                return view
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {view['status']} after {timeout_s} s")


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Live:
    root = tmp_path_factory.mktemp("security")
    data, outside, workspace = root / "data", root / "outside", root / "ws"
    (data / "real").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(99))
    (outside / "sam_vit_b_secret.pth").write_bytes(b"weights")
    tokens = root / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    tokens.chmod(0o600)
    with ServiceProcess(workspace, [data], tokens, root / "serve.log") as process:
        yield Live(process.url, data, outside, workspace)


def test_http_sam_extractor_is_no_file_exists_oracle(live):
    (live.data / "sam_vit_b_out.pth").symlink_to(live.outside / "sam_vit_b_secret.pth")
    answers = []
    for path in ("/etc/passwd", "/nonexistent-dir-xyz/sam_vit_b.pth",
                 str(live.outside / "sam_vit_b_secret.pth"), str(live.data / "sam_vit_b_out.pth"),
                 f"{live.data}/../outside/sam_vit_b_secret.pth"):
        response = live.call("POST", "/v1/jobs", json={"kind": "optidel", "params": {
            "embedding_run": "r", "fraction": 0.1, "extractor": f"sam:{path}"}})
        answers.append((response.status_code, response.text))
    assert len(set(answers)) == 1, answers  # byte for byte the same answer
    status, text = answers[0]
    assert status == 403 and str(live.data) not in text and str(live.workspace) not in text
    relative = live.call("POST", "/v1/jobs", json={"kind": "optidel", "params": {
        "embedding_run": "r", "fraction": 0.1, "extractor": "sam:sam_vit_b.pth"}})
    assert relative.status_code == 422 and "relative path" in relative.text


def test_http_uris_with_queries_encodings_or_relative_file_are_refused(live):
    before = live.call("GET", "/v1/jobs").json()["total"]
    for source, status, reason in [
            ("s3://bucket/ws/x.csv?endpoint_override=127.0.0.1:9&scheme=http", 403,
             "query string"),
            ("s3://bucket/ws/%2e%2e/x.csv", 403, "percent-encode"),
            ("s3://user:pass@bucket/x.csv", 403, "credentials"),
            ("s3://bucket/x.csv#frag", 403, "fragment"),
            ("file://relative/x", 422, "relative path"),
            (f"file://{live.outside}/secret.png", 403, OUTSIDE)]:
        response = live.call("POST", "/v1/jobs", json={"kind": "ingest", "params": {
            "source": source, "name": "x"}})
        assert response.status_code == status, (source, response.text)
        assert reason in response.json()["detail"]
        assert str(live.data) not in response.text and str(live.workspace) not in response.text
    assert live.call("GET", "/v1/jobs").json()["total"] == before  # nothing was submitted


def test_http_ingest_of_a_manifest_listing_paths_out(live):
    table = _manifest_archive(live.data, live.outside)
    view = live.job("ingest", {"source": str(table), "name": "manifest",
                               "confine_to": ["/"]})  # the service replaces it
    assert view["status"] == "SUCCEEDED", view
    collection = live.call("GET", "/v1/collections/manifest").json()
    summary = collection["summary"]
    assert (summary["ingested"], summary["rejected"]) == (1, 9)  # the outside image: not read
    assert summary["reject_reasons"][f"'path' cell refused: {OUTSIDE}"] == 6
    assert "confine_to" not in collection["config"]
    text = json.dumps(collection) + view["logs"]
    for secret in ("secret", "/etc/", "hostname", "passwd"):
        assert secret not in text, secret
    rejects = _rejects(live.workspace, "manifest")
    _no_leak([r for r in rejects if "missing.png" not in r["uri"]], live.outside)


def test_http_ingest_of_a_folder_with_links_out(live):
    folder = live.data / "folder"
    (folder / "cls_a").mkdir(parents=True)
    (folder / "cls_a" / "good.png").write_bytes(_png(2))
    (folder / "cls_a" / "leak.png").symlink_to(live.outside / "secret.png")
    (folder / "cls_b").symlink_to(live.outside)
    (folder / "loop").symlink_to(folder)
    view = live.job("ingest", {"source": str(folder), "name": "folder"})
    assert view["status"] == "SUCCEEDED", view
    summary = live.call("GET", "/v1/collections/folder").json()["summary"]
    assert (summary["ingested"], summary["rejected"]) == (1, 2)
    assert summary["reject_reasons"] == {OUTSIDE: 2}
    rejects = _rejects(live.workspace, "folder")
    assert sorted(r["uri"] for r in rejects) == [str(folder / "cls_a" / "leak.png"),
                                                 str(folder / "cls_b")]
    _no_leak(rejects, live.outside)


def test_http_npz_bomb_fails_the_job_with_a_clear_message(live):
    bomb = _npz(live.data / "bomb.npz", train_images=np.zeros((4, 8, 8), np.uint8),
                train_labels=np.zeros((4, 1), np.uint8))
    _claim_size(bomb, "train_images.npy", 3_000_000_000)
    view = live.job("ingest", {"source": str(bomb), "name": "bomb"}, timeout_s=180)
    assert view["status"] == "FAILED", view
    assert "declares 3,000,000,000 bytes uncompressed, over the limit" in view["error"]
    assert "decompression bomb" in view["error"]
    assert live.call("GET", "/v1/collections/bomb").status_code == 404
