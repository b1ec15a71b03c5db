"""Shared fixtures. Unit tests run offline on tiny random-init models; `integration` tests run real
torchrun / kfp.local (and, where marked, a real S3 server)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def llmneo_run_process(root: Path, preset: str, *overrides: str, args: tuple[str, ...] = (),
                       timeout: int = 600) -> tuple[Path, subprocess.CompletedProcess]:
    """`llmneo run [args]` (the whole DAG through kfp.local) in ``root``, registry under
    ``root/registry``: (the run's pipeline folder, the finished process with its stdout and stderr).
    Fails the test with the run's output tail."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmneo_pipelines.cli", "run", "--preset", preset, "--pipeline-root", str(root / "kfp"),
         *args, f"registry.uri={root / 'registry'}", *overrides],
        capture_output=True, text=True, cwd=root, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list((root / "kfp").iterdir())
    return run_dir, proc


def llmneo_run(root: Path, preset: str, *overrides: str, timeout: int = 600) -> tuple[Path, str]:
    """:func:`llmneo_run_process`: (the run's pipeline folder, its stdout)."""
    run_dir, proc = llmneo_run_process(root, preset, *overrides, timeout=timeout)
    return run_dir, proc.stdout


@pytest.fixture
def tiny_cfg():
    from llmneo.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """Prepared dataset + tiny teacher/student folders, built once per session (steps 1-2)."""
    from llmneo.config import load_config
    from llmneo.steps import load_teacher, prepare_dataset

    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config("tiny")
    prepare_dataset(cfg, root / "dataset")
    load_teacher(cfg, root / "dataset", root / "teacher", root / "student")
    return root


@pytest.fixture
def python():
    return sys.executable


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback for the whole session (started once, stopped at exit)."""
    from s3server import start

    server = start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS_* variables pointing at the test server, for one test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, empty bucket name on the test server."""
    import uuid

    from llmneo.storage.s3 import client

    name = f"t-{uuid.uuid4().hex[:12]}"
    client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads only contend on a shared 2-core CI machine (modules that train
    tiny models in process use it: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prompt_and_padding_batch(vocab: int, low: int = 1) -> dict:
    """Two rows of 9 random tokens in [low, vocab): row 0 has a 3-token prompt (no labels), row 1 two
    padding positions (no labels, attention mask 0)."""
    import torch

    from llmneo.losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(low, vocab, (2, 9), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
