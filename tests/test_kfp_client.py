"""`llmneo upload` / `llmneo submit` against a recording fake kfp.Client: versions with descriptions,
idempotent re-upload, run parameters (configuration validated locally, pool file, --param), URLs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from kfp_fake import FakeKfp

from conftest import REPO
from llmneo.errors import UserError
from llmneo_pipelines import kfp_client

GKE_POOL = REPO / "k8s" / "overlays" / "gke-a100" / "pool.yaml"


def test_pipeline_name_matches_the_dag():
    from llmneo_pipelines.llm_neo import PIPELINE_NAME

    assert kfp_client.PIPELINE_NAME == PIPELINE_NAME
    assert kfp_client.package_path().read_text() == (REPO / "pipelines" / "llm_neo.yaml").read_text()


def test_upload_creates_pipeline_and_version_then_is_idempotent():
    fake = FakeKfp()
    first = kfp_client.upload(fake, version="0.1.0")
    assert first["created"] and first["version"] == "0.1.0"
    (up,) = [c for c in fake.calls if c[0] == "upload_pipeline"]
    assert up[1] == "llm-neo" and up[2].startswith("LLM-NEO: distill a teacher LLM")  # the DAG's description
    (ver,) = [c for c in fake.calls if c[0] == "upload_pipeline_version"]
    assert ver[1] == "0.1.0" and ver[2] == first["pipeline_id"] and ver[3].startswith("llmneo 0.1.0: LLM-NEO")
    fake.calls.clear()
    again = kfp_client.upload(fake, version="0.1.0")
    assert not again["created"] and again["version_id"] == first["version_id"]
    assert fake.mutations() == []  # nothing uploaded twice


def test_default_version_name_is_a_content_hash(tmp_path):
    fake = FakeKfp()
    a = kfp_client.upload(fake)
    changed = tmp_path / "p.yaml"
    changed.write_text(kfp_client.package_path().read_text() + "\n# changed\n")
    b = kfp_client.upload(fake, package=changed)
    assert a["version"].startswith("0.1.0-") and b["version"] != a["version"] and b["created"]
    assert kfp_client.upload(fake)["created"] is False


def test_submit_sends_validated_parameters_and_returns_the_url():
    fake = FakeKfp()
    pool = kfp_client.read_pool(GKE_POOL)
    result = kfp_client.submit(fake, "http://kfp.example:8080/", "smollm2-demo", ["distill.alpha=0.9"], pool,
                               {"distill_nodes": 1, "eval_gpus": 0}, run_name="r1")
    (run,) = fake.runs
    assert run["params"] == {"preset": "smollm2-demo", "overrides": ["distill.alpha=0.9"], "max_kl_to_teacher": 1e6,
                             "distill_gpus": 6, "eval_gpus": 0, "distill_nodes": 1,
                             "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
                             "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    assert run["package"] == str(kfp_client.package_path()) and run["service_account"] == "llmneo-pipeline"
    assert run["experiment_id"] == "exp-llmneo" and run["job_name"] == "r1"
    assert result["url"] == f"http://kfp.example:8080/#/runs/details/{result['run_id']}"


def test_submit_an_uploaded_version():
    fake = FakeKfp()
    up = kfp_client.upload(fake, version="0.1.0")
    kfp_client.submit(fake, "http://h", "tiny", [], version="0.1.0")
    (run,) = fake.runs
    assert (run["pipeline_id"], run["version_id"], run["package"]) == (up["pipeline_id"], up["version_id"], None)
    with pytest.raises(UserError, match=r"^pipeline llm-neo: no version 9.9: run `llmneo upload --version 9.9`"):
        kfp_client.submit(fake, "http://h", "tiny", [], version="9.9")


@pytest.mark.parametrize("overrides, params, message", [
    (["distill.alpha=3"], {}, r"^distill.alpha: must be <= 1.0"),
    ([], {"distil_gpus": 2}, r"^parameter distil_gpus: not a pipeline parameter; known: distill_gpus"),
    ([], {"distill_gpus": "six"}, r"^parameter distill_gpus: expected number_integer, got 'six'"),
    ([], {"gpu_tolerations": {"key": "x"}}, r"^parameter gpu_tolerations: expected list"),
    ([], {"distill_nodes": 2}, r"^cluster.staging_uri: set an s3:// prefix for distill_nodes=2"),
])
def test_submit_fails_locally_before_any_call(overrides, params, message):
    fake = FakeKfp()
    with pytest.raises(UserError, match=message):
        kfp_client.submit(fake, "http://h", "tiny", overrides, params=params)
    assert fake.calls == []


def test_multinode_submit_with_staging():
    fake = FakeKfp()
    kfp_client.submit(fake, "http://h", "tiny", ["cluster.staging_uri=s3://b/stage"], params={"distill_nodes": 2})
    assert fake.runs[0]["params"]["distill_nodes"] == 2


def test_cli_submit_prints_the_run_url(monkeypatch, capsys, tmp_path):
    from llmneo_pipelines.cli import main

    fake = FakeKfp()
    monkeypatch.setattr(kfp_client, "connect", lambda host, namespace=None: fake)
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"distill_gpus": 2}))
    assert main(["submit", "--host", "http://kfp:8080", "--preset", "tiny", "--pool-file", str(pool),
                 "--param", "eval_gpus=0", "--run-name", "cli-run", "distill.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "run cli-run (id-1): http://kfp:8080/#/runs/details/id-1" in out
    assert fake.runs[0]["params"]["distill_gpus"] == 2 and fake.runs[0]["params"]["overrides"] == ["distill.max_steps=2"]
    assert main(["upload", "--host", "http://kfp:8080", "--version", "0.1.0"]) == 0
    assert "uploaded llm-neo version 0.1.0" in capsys.readouterr().out


def test_cli_errors_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "submit", "--host", "http://127.0.0.1:9", "--preset",
                           "tiny", "--param", "distill_nodes=2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: cluster.staging_uri: set an s3:// prefix for distill_nodes=2 (the TrainJob's "
                                   "nodes exchange inputs and the adapter there)")
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "submit", "--preset", "tiny"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --host: the Kubeflow Pipelines URL is required")


def test_unreachable_host_with_the_real_client_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "upload", "--host", "http://127.0.0.1:9"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: connect to http://127.0.0.1:9: cannot reach Kubeflow Pipelines")
    assert len(proc.stderr.strip().splitlines()) == 1
