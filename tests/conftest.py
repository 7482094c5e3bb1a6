"""Shared fixtures: the real data sets beside the repo, one Ray per session, a fresh workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medcurate.workspace import Workspace
from ray_cluster import two_node_cluster  # noqa: F401 - a fixture
from s3_servers import moto_s3, s3_bucket, s3_server, seaweed_s3  # noqa: F401 - fixtures

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_DATA_MISSING = ("../shared/data is absent: real-data tests need the shared data sets "
                       "beside the repo")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo root>/../shared/data``; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(SHARED_DATA_MISSING)
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: every in-process ingest reuses it."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from medcurate.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(str(tmp_path / "ws"))


@pytest.fixture(scope="session")
def two_node_cluster_env(seaweed_s3) -> dict[str, str]:
    """Every process of the two-node test cluster reaches the session's SeaweedFS store, as a
    real cluster's nodes reach their bucket (nodes share no disk)."""
    return seaweed_s3.env()


ZOO = """models:
  - {name: mobilenetv2, model: mobilenetv2-imagenet}
  - {name: lite0, model: efficientnet-lite0-imagenet}
"""


@pytest.fixture(scope="module")
def real(tmp_path_factory, shared_data, ray_session):
    """A workspace with the collections ``breast`` and ``pneumonia`` (the real BreastMNIST and
    PneumoniaMNIST) and a zoo of two packaged ImageNet encoders: what the fine-tuning, audit
    and comparison tests train on (test_finetune.py, test_audit.py, test_compare.py)."""
    from medcurate.config import IngestConfig
    from medcurate.ingest import ingest

    root = tmp_path_factory.mktemp("finetune")
    workspace = Workspace(str(root / "ws"))
    for name in ("breastmnist", "pneumoniamnist"):
        ingest(IngestConfig(source=str(shared_data / name / f"{name}.npz"),
                            name=name.removesuffix("mnist")), workspace)
    zoo = root / "zoo.yaml"
    zoo.write_text(ZOO)
    return workspace, zoo
