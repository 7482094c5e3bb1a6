"""bench/gpu_check.py: its --dry-run (what a CPU machine can check of the GPU run) and its
clean failures. The GPU run itself needs a GPU machine (see the script's docstring)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"


def _module():
    """The script as a module, for its list of steps (importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_check(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_every_step(shared_data, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run_check("--dry-run", "--data", str(shared_data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    steps = _module().STEPS
    assert len(steps) >= 8
    for number, step in enumerate(steps, 1):
        assert f"{number}. {step.name}: " in result.stdout
    assert f"plan ({len(steps)} steps)" in result.stdout
    assert "dry run ok" in result.stdout
    assert "GPU packages: torch=" in result.stdout
    assert not out.exists()  # a dry run writes no figures


def test_missing_data_is_a_clean_error(tmp_path):
    result = run_check("--dry-run", "--data", str(tmp_path / "absent"))
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "--data" in result.stderr
    assert "Traceback" not in result.stderr


def test_real_run_without_gpu_packages_says_what_to_install(shared_data, tmp_path):
    import faiss

    if importlib.util.find_spec("cuml") and hasattr(faiss, "StandardGpuResources"):
        pytest.skip("cuML and faiss-gpu are installed: the real run would start")
    out = tmp_path / "gpu_check.json"
    result = run_check("--data", str(shared_data), "--out", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for line in ("cuml-cu12", "faiss-gpu-cu12", "pypi.nvidia.com", "conda install"):
        assert line in result.stderr
    assert not out.exists()
