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
    def _valid_name(cls, value: str) -> str:
        return validate_key(value)

    @field_validator("source", "metadata")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute_location(value)
