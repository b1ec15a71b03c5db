"""Shared fixtures. Unit tests run offline on tiny random-init models; `integration` tests run real
torchrun / kfp.local (and, where marked, a real S3 server)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cfg():
    from llmneo.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """Prepared dataset + tiny teacher/student folders, built once per session (steps 1-2)."""
    from llmneo.config import load_config
    from llmneo.steps import run_prep, run_teacher

    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config("tiny")
    run_prep(cfg, root / "dataset")
    run_teacher(cfg, root / "dataset", root / "teacher", root / "student")
    return root


@pytest.fixture
def python():
    return sys.executable
