"""Which cosine threshold should ``medcurate dedup`` default to? Archive-scale precision and
recall on whole real archives, judged by pixels, plus recall of made copies.

The 60 labelled images of ``tests/test_dedup.py`` make 1,770 distinct pairs: too few to see
how often two *different* images of a real archive cross a threshold. Here every image of the
brain MRI set (7,019 slices, ``Training`` + ``Testing``) and of HAM10000 (5,984 lesions) is
ingested with ``medcurate ingest`` and embedded as ``medcurate embed`` does (the same decode
and preprocessing, ``decode_preprocess``, the same encoder, ``create_encoder``, at its own
224 px input side; identical vectors, checked against an ``embed`` run of the brain set), in
this process rather than on Ray: the model is the cost either way, and Ray's actor ran it
slower on this 2-core machine (19 against 29 images/s). Two archives whose images all look
alike to an ImageNet encoder are measured too: PneumoniaMNIST's chest X-rays (5,830 images of
28 px) and the synthetic archive ``medcurate curate`` runs without a source (300 images).

Every pair an embedding threshold joins is judged by **pixels**, independently of the
embeddings: two images are the same picture (*pixel twins*) when their 32 px greyscale
thumbnails correlate above 0.95, as they are or one mirrored (the rule of
``tests/test_dedup.py``), or when their files are byte-identical. Correlation ignores
brightness and contrast, not crops, zooms or shifts: a pair the judge calls distinct may be one
slice re-cut (the brain set has many), so the precision below is a lower bound. All pairs'
thumbnails are compared (a 7,019² matrix product), so the pixel twins are known exhaustively
and recall against them is exact, not sampled. Per threshold, per archive:

- ``pairs``: pairs with cosine >= t (``near_duplicate_groups``, the command's own search);
  ``precision``: the share that are pixel twins; ``distinct``: the rest;
- ``groups``, ``grouped``, ``removed``: what ``dedup`` would report (``keep_rule`` central);
  ``removal_precision``: the share of removed images that are a pixel twin of the image kept
  for them, directly or through a chain of twins (connected components of the twin relation);
- ``twin_recall``: the share of all pixel-twin pairs whose two images land in one group.

Made copies (exact, JPEG q90 and q50, resized to 0.8, 5% cropped, mirrored) of 100 images of
each diverse archive that have no pixel twin there: the share of each kind whose cosine to its
original reaches t (``copy_recall``). The default is then chosen by a stated rule
(``choose``): the lowest threshold at and above which dedup wrongly removes (removes an image
that is no pixel twin of the one kept for it) at most ``--max-wrong`` (1%) of the images of
every archive: the most copies found while no archive loses more than that of its distinct
images.

    .venv/bin/python bench/dedup_threshold.py --json docs/results/dedup_threshold.json

Embeddings are cached in ``--cache`` (keyed by archive, encoder and row count). A first run
embeds 19,133 images: about 11 minutes at the 29 images/s this machine gives when quiet, over
the 10 minutes aimed at. With the cache a run took 286 s while other jobs shared the 2 cores
(the made copies' 1,400 embeddings and the 32 all-pairs searches).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from medcurate.config import IngestConfig
from medcurate.dedup import components, keep_rule, near_duplicate_groups, unit_rows
from medcurate.demo import make_demo_archive
from medcurate.ingest import ingest, read_manifest
from medcurate.ingest.decode import decode_preprocess, image_columns, load_rows
from medcurate.synthetic import NEAR_COPY_KINDS, near_copy
from medcurate.workspace import Workspace

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# From 0.93 up: below it most brain MRI pairs are distinct images (measured: 43% at 0.92, 75%
# at 0.90) and on chest X-rays nearly all are (0.93 already joins 343k pairs of 5,830 X-rays,
# 4.5 GB in near_duplicate_groups; 0.90 ran out of this machine's 24 GB)
THRESHOLDS = (0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995)
PIXEL_TWIN = 0.95  # thumbnail correlation above which two images are one picture
THUMB = 32  # thumbnail side
MODEL = "mobilenetv2-imagenet"
BATCH = 64
BLOCK = 2048  # rows per block of an all-pairs product


# -- the archives --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Archive:
    config: IngestConfig  # how ``medcurate ingest`` reads it
    splits: tuple[str, ...] | None = None  # the splits measured (None: every image)
    copies: bool = True  # whether made copies of its images measure copy recall


def archives(data: Path, demo_root: Path) -> dict[str, Archive]:
    """Two diverse real archives; chest X-rays (PneumoniaMNIST, every split), whose images all
    look alike to an ImageNet encoder; and the synthetic archive ``medcurate curate`` runs
    without a source (``demo.make_demo_archive``, 300 images of three shapes), as alike."""
    ham = data / "ham10000"
    demo = make_demo_archive(demo_root, per_class=100)
    return {
        "brain-mri": Archive(IngestConfig(source=str(data / "brain-tumor-mri"), name="brain")),
        "ham10000": Archive(IngestConfig(source=str(ham / "images"), name="ham",
                                         metadata=str(ham / "metadata.csv"),
                                         id_column="image_id", label_column="dx")),
        "pneumoniamnist": Archive(IngestConfig(
            source=str(data / "pneumoniamnist" / "pneumoniamnist.npz"), name="pneumonia"),
            copies=False),
        "demo": Archive(IngestConfig(source=str(demo), name="demo",
                                     metadata=str(demo / "metadata.csv"), id_column="file"),
                        copies=False),
    }


def ingested(archive: Archive, workspace: Workspace) -> pa.Table:
    """The archive's manifest rows measured (uri, split, sha256, ...), ingested once per
    workspace."""
    config = archive.config
    if not workspace.exists("collections", config.name):
        ingest(config, workspace)
    manifest = read_manifest(workspace, config.name)
    if archive.splits is None:
        return manifest
    return manifest.filter(pc.is_in(manifest.column("split"), pa.array(archive.splits)))


def embed_rows(rows: dict, model: str = MODEL) -> np.ndarray:
    """Embeddings of manifest rows exactly as ``medcurate embed`` computes them (its actor's
    decode, preprocessing and forward pass), batch by batch in this process."""
    import torch

    from medcurate.models import create_encoder

    encoder = create_encoder(model)
    out, n = [], len(rows["uri"])
    with torch.inference_mode():
        for start in range(0, n, BATCH):
            batch = {k: v[start:start + BATCH] for k, v in rows.items()}
            pixels = decode_preprocess(batch, encoder.preprocessing)
            out.append(encoder(torch.from_numpy(pixels)).numpy())
    return np.concatenate(out)


def cached_embeddings(name: str, rows: dict, cache: Path | None) -> tuple[np.ndarray, float]:
    """``embed_rows``, read from ``cache`` where an earlier run left it; (embeddings, seconds
    spent embedding, 0 where cached)."""
    path = cache / f"{name}-{MODEL}-{len(rows['uri'])}.npy" if cache else None
    if path and path.is_file():
        return np.load(path), 0.0
    clock = time.perf_counter()
    X = embed_rows(rows)
    seconds = time.perf_counter() - clock
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, X)
    return X, seconds


# -- the pixel judge -----------------------------------------------------------------------------
def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """32 px greyscale, standardised (mean 0, length 1): a dot product of two is their
    Pearson correlation. A flat image (no variance) stays all zero and twins nothing."""
    image = Image.fromarray(pixels if pixels.dtype == np.uint8 else
                            (np.clip(pixels / max(float(pixels.max()), 1e-12), 0, 1) * 255
                             ).astype(np.uint8))
    t = np.asarray(image.convert("L").resize((THUMB, THUMB)), dtype=np.float64).ravel()
    t = t - t.mean()
    norm = np.linalg.norm(t)
    return (t / norm if norm else t).astype(np.float32)


def mirrored(thumbs: np.ndarray) -> np.ndarray:
    return thumbs.reshape(-1, THUMB, THUMB)[:, :, ::-1].reshape(len(thumbs), -1)


def pixel_twin_pairs(thumbs: np.ndarray, bar: float = PIXEL_TWIN) -> np.ndarray:
    """Every pair i < j whose thumbnails correlate above ``bar``, as they are or one
    mirrored: all pairs compared, a block of rows at a time."""
    flipped = mirrored(thumbs)
    found = []
    for start in range(0, len(thumbs), BLOCK):
        block = thumbs[start:start + BLOCK]
        corr = np.maximum(block @ thumbs.T, block @ flipped.T)
        i, j = np.nonzero(corr > bar)
        i += start
        keep = i < j
        found.append(np.column_stack([i[keep], j[keep]]))
    return np.concatenate(found).astype(np.int64)


def pair_keys(pairs: np.ndarray, n: int) -> np.ndarray:
    return pairs[:, 0] * n + pairs[:, 1]


# -- archive-scale precision and recall ---------------------------------------------------------
def archive_row(X: np.ndarray, twins: np.ndarray, twin_component: np.ndarray,
                threshold: float) -> dict:
    """What ``dedup`` would find at ``threshold`` on one archive, judged by pixels."""
    n = len(X)
    found = near_duplicate_groups(X, threshold)
    is_twin = np.isin(pair_keys(found.pairs, n), pair_keys(twins, n))
    kept = keep_rule(X, found.group, "central")
    removed = np.flatnonzero(~kept.kept)
    same_picture = twin_component[removed] == twin_component[kept.kept_row[removed]]
    together = (found.group[twins[:, 0]] >= 0) & \
        (found.group[twins[:, 0]] == found.group[twins[:, 1]])
    wrong = int(len(removed) - same_picture.sum())
    return {"threshold": threshold, "pairs": int(len(found.pairs)),
            "distinct": int((~is_twin).sum()),
            "precision": ratio(is_twin.sum(), len(is_twin)),
            "groups": found.groups, "grouped": found.grouped, "removed": int(len(removed)),
            "removal_precision": ratio(same_picture.sum(), len(removed)),
            "wrongly_removed": wrong, "wrongly_removed_share": ratio(wrong, n),
            "twin_recall": ratio(together.sum(), len(twins))}


def ratio(part, whole) -> float | None:
    return round(float(part) / whole, 4) if whole else None


def twin_cosines(X: np.ndarray, twins: np.ndarray) -> dict:
    """How close the embedding puts pixel twins: quantiles of their cosine."""
    unit = unit_rows(X)
    cos = np.einsum("ij,ij->i", unit[twins[:, 0]], unit[twins[:, 1]])
    return {f"p{q}": round(float(np.percentile(cos, q)), 4) for q in (1, 5, 10, 25, 50)} \
        if len(cos) else {}


def nearest_cosine(X: np.ndarray, twin_component: np.ndarray) -> dict:
    """Median and 90th percentile, over images, of the cosine to the nearest image that is
    not a pixel twin (nor a byte copy): how close the merely similar sit."""
    unit = unit_rows(X)
    best = np.empty(len(unit), np.float32)
    for start in range(0, len(unit), BLOCK):
        sims = unit[start:start + BLOCK] @ unit.T
        same = twin_component[start:start + BLOCK, None] == twin_component[None, :]
        sims[same] = -1.0  # itself and its twins
        best[start:start + BLOCK] = sims.max(axis=1)
    return {"median": round(float(np.median(best)), 4),
            "p90": round(float(np.percentile(best, 90)), 4),
            "p99": round(float(np.percentile(best, 99)), 4)}


# -- made copies ----------------------------------------------------------------------------------
def copy_cosines(rows: dict, model: str = MODEL) -> dict[str, np.ndarray]:
    """Per copy kind, the cosine of each image's copy (of manifest ``rows``) to the image."""
    import torch

    from medcurate.models import create_encoder
    from medcurate.models.preprocess import preprocess_batch

    encoder = create_encoder(model)
    images = [Image.fromarray(pixels) for pixels in load_rows(rows)]

    def embed(batch: list[Image.Image]) -> np.ndarray:
        arrays = [np.asarray(im) for im in batch]
        with torch.inference_mode():
            out = encoder(torch.from_numpy(preprocess_batch(arrays, encoder.preprocessing)))
        return unit_rows(out.numpy())

    originals = np.concatenate([embed(images[s:s + BATCH]) for s in range(0, len(images), BATCH)])
    cosines = {}
    for kind in NEAR_COPY_KINDS:
        copies = [near_copy(im, kind) for im in images]
        Y = np.concatenate([embed(copies[s:s + BATCH]) for s in range(0, len(copies), BATCH)])
        cosines[kind] = np.einsum("ij,ij->i", originals, Y)
    return cosines


def copy_sample(twin_component: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` rows, seeded, of images with no pixel twin (nor byte copy) in the archive:
    their made copies are the only copies they have."""
    alone = np.flatnonzero(np.bincount(twin_component)[twin_component] == 1)
    return np.sort(np.random.default_rng(seed).choice(alone, count, replace=False))


# -- the rule ------------------------------------------------------------------------------------
def choose(rows: dict[str, list[dict]], max_wrong: float) -> float | None:
    """The lowest threshold at which, and at every higher one, dedup wrongly removes (removes
    an image that is no pixel twin of the one kept for it) at most ``max_wrong`` of the images
    of every archive: the most copies found while no archive loses more than that share of
    its distinct images. A share of the archive, not of the removals: on an archive without
    copies two removals, one wrong, are a precision of 0.5 and a loss of 0.3%. None if even
    the highest fails."""
    chosen = None
    for t in sorted(THRESHOLDS, reverse=True):  # from the strictest down, while all pass
        if any(r["wrongly_removed_share"] > max_wrong
               for archive in rows.values() for r in archive if r["threshold"] == t):
            break
        chosen = t
    return chosen


def thumbnails(rows: dict, batch: int = 512) -> np.ndarray:
    """``thumbnail`` of each manifest row, decoded as every stage decodes (``load_rows``)."""
    n = len(rows["uri"])
    return np.stack([thumbnail(pixels) for start in range(0, n, batch)
                     for pixels in load_rows({k: v[start:start + batch] for k, v in rows.items()})])


def measure_archive(name: str, archive: Archive, workspace: Workspace, cache: Path | None,
                    copies_per_archive: int, seed: int) -> dict:
    clock = time.perf_counter()
    manifest = ingested(archive, workspace)
    rows = manifest.select(image_columns(manifest)).to_pydict()
    X, embed_s = cached_embeddings(name, rows, cache)
    thumbs = thumbnails(rows)
    twins = pixel_twin_pairs(thumbs)
    sha = np.asarray(manifest.column("sha256").to_pylist())
    _, byte_group = np.unique(sha, return_inverse=True)
    # byte copies are the same picture whatever the thumbnails say
    byte_pairs = np.array([(i, j) for g in np.flatnonzero(np.bincount(byte_group) > 1)
                           for i, j in _all_pairs(np.flatnonzero(byte_group == g))],
                          np.int64).reshape(-1, 2)
    twins = np.unique(np.concatenate([twins, byte_pairs]), axis=0)
    twin_component = components(len(X), twins)
    table = [archive_row(X, twins, twin_component, t) for t in THRESHOLDS]
    sample = copy_sample(twin_component, copies_per_archive if archive.copies else 0, seed)
    cosines = copy_cosines({k: [v[i] for i in sample] for k, v in rows.items()}) \
        if len(sample) else {}
    for row in table:
        row["copy_recall"] = {k: round(float((c >= row["threshold"]).mean()), 4)
                              for k, c in cosines.items()}
    return {"images": len(X), "embed_s": round(embed_s, 1),
            "byte_copy_pairs": int(len(byte_pairs)), "pixel_twin_pairs": int(len(twins)),
            "images_with_a_twin": int((np.bincount(twin_component)[twin_component] > 1).sum()),
            "twin_cosine": twin_cosines(X, twins),
            "nearest_distinct_cosine": nearest_cosine(X, twin_component),
            "splits": archive.splits, "copies_of": int(len(sample)), "thresholds": table,
            "seconds": round(time.perf_counter() - clock, 1)}


def _all_pairs(rows: np.ndarray):
    return [(int(a), int(b)) for k, a in enumerate(rows) for b in rows[k + 1:]]


def markdown(result: dict) -> str:
    head = ["archive", "threshold", "pairs", "precision", "groups", "grouped", "removed",
            "removal precision", "wrongly removed", "twin recall", *NEAR_COPY_KINDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, archive in result["archives"].items():
        for r in archive["thresholds"]:
            cells = [name, f"{r['threshold']:g}", r["pairs"], r["precision"], r["groups"],
                     r["grouped"], r["removed"], r["removal_precision"],
                     r["wrongly_removed"], r["twin_recall"],
                     *(r["copy_recall"].get(k) for k in NEAR_COPY_KINDS)]
            lines.append("| " + " | ".join("–" if c is None else f"{c:g}" if isinstance(c, float)
                                           else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA), help="the shared data folder")
    parser.add_argument("--workspace", default=None, help="workspace for the ingested "
                        "collections (default: a temporary one)")
    parser.add_argument("--cache", default=None, help="folder caching the embeddings")
    parser.add_argument("--copies", type=int, default=100, help="images per archive whose "
                        "made copies measure copy recall")
    parser.add_argument("--max-wrong", type=float, default=0.01, help="share of an archive's "
                        "images the chosen threshold may remove wrongly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        workspace = Workspace(args.workspace or f"{scratch}/ws")
        # beside a kept workspace, so that its demo collection's files stay where ingested
        demo = Path(f"{args.workspace}-demo" if args.workspace else f"{scratch}/demo")
        cache = Path(args.cache) if args.cache else None
        result = {"model": MODEL, "pixel_twin": PIXEL_TWIN, "thumbnail": THUMB,
                  "archives": {name: measure_archive(name, archive, workspace, cache,
                                                     args.copies, args.seed)
                               for name, archive in archives(Path(args.data), demo).items()}}
    rows = {name: a["thresholds"] for name, a in result["archives"].items()}
    result["rule"] = (f"lowest threshold at and above which dedup wrongly removes at most "
                      f"{args.max_wrong:.0%} of the images of every archive")
    result["chosen"] = choose(rows, args.max_wrong)
    result["seconds"] = round(time.perf_counter() - clock, 1)
    print(markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k != "archives"}), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
