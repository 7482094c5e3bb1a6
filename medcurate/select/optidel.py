"""OptiDEL: pretraining-data selection by V-information (Yang et al., "A Self-Supervised
Paradigm for Data-Efficient Medical Foundation Model Pre-training: V-information Optimization
Framework").

The paper casts choosing a pretraining subset as maximising the V-information
``I_V(X→Y) = H_V(Y|∅) − H_V(Y|X)``: samples the current model finds hard lower ``H_V(Y|X)``
less than easy ones do (they carry more that it has not learnt), and diverse samples raise
``H_V(Y|∅)``. Here, in the embedding space of the encoder that made the embedding run:

* **Hardness: the margin.** k-means puts ``n_clusters`` prototypes in the pool; a sample's
  margin is its Euclidean distance to the boundary of its nearest prototype's Voronoi cell,
  ``min_j (d_j² − d_1²) / (2·|c_1 − c_j|)`` (``d_j``: distance to prototype ``c_j``, ``c_1`` the
  nearest): the distance to the hyperplane that separates it from the nearest competing
  prototype. Small margin = ambiguous between two modes of the data = hard. The
  ``hard_share`` of the pool with the smallest margins is the hard pool.
* **Diversity: k-center greedy** over the hard pool (``kcenter_greedy``, as the baseline) picks
  the real images and, after them, the bases of the synthetic ones.
* **Synthesis.** Each synthetic image is a base from the hard pool with patches of a donor
  from another prototype's cluster pasted at their own places (half its area): a new sample
  between two modes. Its patches come from a pluggable extractor (grid cells, or SAM's
  regions as in the paper; see ``medcurate.select.patches``). ``synth_share`` of the selected
  total is synthetic.

``fraction`` of the pool is selected in all (real + synthetic). Labels are ignored: the
strategy works on unlabeled pretraining archives. The synthetic images need pixels, so the
strategy returns a ``SynthesisPlan`` that the caller renders (``medcurate.select.pool`` writes
them as a collection).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from medcurate import backends
from medcurate.errors import MedcurateError
from medcurate.models.preprocess import Preprocessing, preprocess_batch
from medcurate.select.base import SelectionResult, derive_seed, run_info, validate_embeddings
from medcurate.select.baselines import kcenter_greedy
from medcurate.select.patches import make_extractor, paste

MIX_SHARE = 0.5  # share of a synthetic image's area that its donor's patches cover
DONOR_TRIES = 8  # donors tried per synthetic image until one has patches with content


def prototype_margins(X: np.ndarray, n_clusters: int, seed: int) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """Each row's margin (distance to its nearest prototype's cell boundary, see the module
    docstring) and its nearest prototype, with ``n_clusters`` k-means prototypes. Memory
    O(N · n_clusters)."""
    centres = backends.kmeans(n_clusters, seed).fit(X).cluster_centers_
    sq, nearest = backends.knn(centres, len(centres), queries=X)  # every prototype, nearest first
    gaps = np.sqrt(backends.sq_dists(centres, centres))  # prototype to prototype
    gap = gaps[nearest[:, :1], nearest[:, 1:]]
    with np.errstate(divide="ignore", invalid="ignore"):
        to_boundary = np.where(gap > 0, (sq[:, 1:] - sq[:, :1]) / (2 * gap), 0.0)
    return np.maximum(to_boundary.min(axis=1), 0.0), nearest[:, 0]


@dataclass
class SynthesisPlan:
    """What to synthesise: image ``i`` pastes patches of the first of ``donors[i]`` (rows,
    other clusters first) that has any onto the image of row ``bases[i]``. Rendering reads
    pixels, so the caller runs it with a loader."""

    bases: np.ndarray
    donors: np.ndarray
    clusters: np.ndarray
    extractor: Callable
    seed: int

    def render(self, load: Callable[[int], np.ndarray]) -> Iterator[tuple[np.ndarray | None,
                                                                          dict]]:
        """Yield ``(image, record)`` per synthetic image: uint8 [H, W] or [H, W, 3], square at
        the base's longer side (each source resized whole, as encoders see images), and
        where it came from. ``image`` is None where no donor had a patch with content.
        ``load(row)`` returns the row's decoded image (``medcurate.ingest.decode``)."""
        for i, base_row in enumerate(self.bases.tolist()):
            base = load(base_row)
            prep = Preprocessing(max(base.shape[:2]), 3 if base.ndim == 3 else 1, (0.0,), (1.0,))
            base = preprocess_batch([base], prep)[0]
            record = {"base_row": base_row, "base_cluster": int(self.clusters[base_row])}
            for donor_row in self.donors[i].tolist():
                donor = preprocess_batch([load(donor_row)], prep)[0]
                patches = self.extractor(donor)
                if len(patches):
                    rng = np.random.default_rng(derive_seed(self.seed, "synthesis", i))
                    mixed, share = paste(base, donor, patches, MIX_SHARE, rng)
                    record.update(donor_row=donor_row, donor_cluster=int(self.clusters[donor_row]),
                                  donor_share=round(share, 4))
                    pixels = np.round(np.clip(mixed, 0.0, 1.0) * 255).astype(np.uint8)
                    yield (pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0)), record
                    break
            else:
                yield None, record


def _share(value, name: str, *, zero_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            (0 <= value if zero_ok else 0 < value) and value <= 1):
        interval = "[0, 1]" if zero_ok else "(0, 1]"
        raise MedcurateError(f"{name} must be a number in {interval}; got {value!r}")
    return float(value)


def _donors(pool: np.ndarray, clusters: np.ndarray, bases: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """``DONOR_TRIES`` donor rows per base, drawn from the hard pool outside the base's
    cluster (inside it, less the base, only where the pool has no other cluster)."""
    donors = np.empty((len(bases), DONOR_TRIES), dtype=np.int64)
    for cluster in np.unique(clusters[bases]):
        which = np.flatnonzero(clusters[bases] == cluster)
        others = pool[clusters[pool] != cluster]
        if len(others):
            donors[which] = others[rng.integers(len(others), size=(len(which), DONOR_TRIES))]
            continue
        if len(pool) < 2:
            raise MedcurateError("synthesis needs at least two images in the hard pool; "
                                 "raise hard_share or set synth_share 0")
        for i in which:
            candidates = pool[pool != bases[i]]
            donors[i] = candidates[rng.integers(len(candidates), size=DONOR_TRIES)]
    return donors


def optidel(X, labels, budget_per_class=None, *, seed: int = 0, fraction: float | None = None,
            hard_share: float = 0.2, synth_share: float = 0.5, n_clusters: int = 10,
            extractor: str = "grid", patch_size: int | None = None,
            min_content: float = 0.02) -> SelectionResult:
    """Select ``fraction`` of the pool for pretraining: ``1 − synth_share`` of it real images
    (k-center over the ``hard_share`` smallest-margin rows), the rest synthetic (a plan in
    ``result.synthesis``). ``labels`` are ignored; ``budget_per_class`` must stay None (a
    pretraining pool is budgeted as a whole). Extractor parameters are checked here, before
    any work, though only rendering uses them."""
    if budget_per_class is not None:
        raise MedcurateError("optidel selects a fraction of the whole pool, not a budget per "
                             "class")
    if fraction is None:
        raise MedcurateError("optidel needs fraction: the share of the pool to select, e.g. "
                             "0.05")
    fraction = _share(fraction, "fraction", zero_ok=False)
    hard_share = _share(hard_share, "hard_share", zero_ok=False)
    synth_share = _share(synth_share, "synth_share", zero_ok=True)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral) \
            or n_clusters < 2:
        raise MedcurateError(f"n_clusters must be an integer of at least 2; got {n_clusters!r}")
    derive_seed(seed)  # validates it
    X = validate_embeddings(X)
    if len(X) < 2:
        raise MedcurateError("optidel needs at least two images: margins are measured "
                             "between prototypes")
    patch_extractor = make_extractor(extractor, patch_size=patch_size, min_content=min_content)
    n = len(X)
    total = max(1, round(fraction * n))
    synthetic = round(synth_share * total)
    real = total - synthetic
    margin, clusters = prototype_margins(X, min(int(n_clusters), n), seed)
    order = np.lexsort((np.arange(n), margin))  # smallest margin first; ties by row
    pool_size = min(n, max(round(hard_share * n), total))
    pool = order[:pool_size]
    picked = kcenter_greedy(X[pool], total, centre="the hard pool's mean")
    rows = pool[picked.indices]
    chosen = rows[:real]
    reasons = [f"margin {margin[r]:.3g} (hard pool: the {pool_size} smallest of {n}), "
               f"cluster {clusters[r]}; {why}"
               for r, why in zip(chosen, picked.reason[:real], strict=True)]
    notes = []
    if pool_size > round(hard_share * n):
        notes.append(f"hard pool widened from hard_share {hard_share} to {pool_size} images "
                     f"to hold the {total} selected")
    plan = None
    if synthetic:
        bases = rows[real:]
        rng = np.random.default_rng(derive_seed(seed, "donors"))
        plan = SynthesisPlan(bases=bases, donors=_donors(pool, clusters, bases, rng),
                             clusters=clusters, extractor=patch_extractor, seed=seed)
    params = {"fraction": fraction, "hard_share": hard_share, "synth_share": synth_share,
              "n_clusters": int(n_clusters), "extractor": extractor, "patch_size": patch_size,
              "min_content": min_content}
    info = run_info("optidel", seed, None, params, {}, notes, pool=n, total=total, real=real,
                    synthetic=synthetic, hard_pool=pool_size,
                    cluster_sizes=np.bincount(clusters).tolist(),
                    margin={"median": float(np.median(margin)),
                            "hard_pool_max": float(margin[pool].max())})
    return SelectionResult(indices=chosen.astype(np.int64), group=clusters[chosen].astype(np.int64),
                           reason=reasons, info=info, synthesis=plan)
