"""Shared fixtures: the tiny offline models (built once per session, nothing downloaded)."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from make_tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return REPO / "examples" / "tiny_concept"


def run_script(script, args, launcher=None, check=True):
    """Run one of the project's scripts in a subprocess, offline; fail with its output when it fails."""
    import subprocess

    command = (launcher or [sys.executable]) + [str(REPO / script)] + [str(a) for a in args]
    # Two ranks with two threads each on this 2-core machine run three times slower than with one thread each.
    threads = "1" if launcher and "--multi_gpu" in launcher else "2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def accelerate_config(tmp_path_factory):
    """A single-process accelerate config, as diffusers' example tests write it."""
    from accelerate.utils import write_basic_config

    path = tmp_path_factory.mktemp("accelerate") / "default_config.yaml"
    write_basic_config(save_location=str(path))
    return path


def load_stock(path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)


@pytest.fixture
def zimage(tiny_models):
    return load_stock(tiny_models / "z-image")


@pytest.fixture
def klein(tiny_models):
    return load_stock(tiny_models / "flux2-klein")
