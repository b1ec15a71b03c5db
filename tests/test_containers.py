"""The whole tiny DAG in the project's own images (`llmneo run --runner containers`): data from and
the registry in a real S3 server, only the pipeline root shared with the host; and a step that fails
inside a container fails the run (kfp.local alone reports an auto-removed failed container under
podman as a success). Needs a container engine and the images: `make images` (CI: `make test`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from llmneo_components.images import IMAGE

pytestmark = pytest.mark.integration


def engine_reason() -> str | None:
    """Why no container can run here (the test is skipped), or None."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "containers.sh"), "engine"], capture_output=True, text=True)
    if proc.stdout.strip() == "none":
        return "no container engine: neither a running Docker nor a working podman (scripts/containers.sh setup)"
    return None


@pytest.fixture(scope="module")
def engine():
    reason = engine_reason()
    if reason:
        pytest.skip(reason)
    from llmneo_components.images import CPU_IMAGE, IMAGE
    from llmneo_pipelines import container_run

    container_run.ensure_engine()  # exports DOCKER_HOST for the subprocesses below
    container_run.check_images([IMAGE, CPU_IMAGE])  # missing images fail: `make images`
    return os.environ["DOCKER_HOST"]


def s3_objects(bucket: str, prefix: str) -> dict[str, bytes]:
    from llmneo.storage.s3 import client

    s3 = client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_tiny_dag_in_containers(engine, s3_bucket, tmp_path):
    import hashlib

    from llmneo.models import builtin_path
    from llmneo.storage.s3 import client

    client().upload_file(str(builtin_path("tiny_instruct")), s3_bucket, "data/tiny_instruct.jsonl")
    root = tmp_path / "kfp"
    proc = subprocess.run(
        [sys.executable, "-m", "llmneo_pipelines.cli", "run", "--runner", "containers", "--preset", "tiny",
         "--pipeline-root", str(root), f"data.source=s3://{s3_bucket}/data/",
         f"registry.uri=s3://{s3_bucket}/registry", "distill.max_steps=3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"registered model: s3://{s3_bucket}/registry/tiny-neo/v1" in proc.stdout
    (run,) = [p for p in root.iterdir() if p.name != ".cache"]

    # artifacts written by the containers, owned by this user
    merged_path = run / "merge-eval/model/model.safetensors"
    assert merged_path.stat().st_uid == os.getuid()
    card = json.loads((run / "prep-data/dataset/card.json").read_text())
    assert any(str(s3_bucket) in json.dumps(v) for v in card.values()), "the dataset did not come from S3"

    # trained in the container: B moved from zero, merged = frozen base + scale·B·A exactly
    adapter = load_file(run / "distill/adapter/adapter/adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)
    base, merged = load_file(run / "load-teacher/student/model.safetensors"), load_file(merged_path)
    cfg = json.loads((run / "distill/adapter/adapter/adapter_config.json").read_text())
    for name, w in base.items():
        key = name.removesuffix(".weight")
        a = [v for k, v in adapter.items() if k.endswith(key + ".lora_A.weight")]
        b = [v for k, v in adapter.items() if k.endswith(key + ".lora_B.weight")]
        expected = w + cfg["lora_alpha"] / cfg["r"] * b[0] @ a[0] if a else w
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    log = [json.loads(x) for x in (run / "distill/adapter/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in log for k in ("loss", "ce", "kd", "grad_norm"))
    evaluation = json.loads((run / "merge-eval/model/eval.json").read_text())
    assert evaluation["gate"]["passed"] is True
    assert all(math.isfinite(v) for row in evaluation["fidelity"].values() for v in row.values())

    # the registry lives in S3: the manifest names the merged model's exact bytes
    objects = s3_objects(s3_bucket, "registry/tiny-neo/v1/")
    manifest = json.loads(objects["registry/tiny-neo/v1/manifest.json"])
    files = {f["path"]: f for f in manifest["files"]}
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(merged_path.read_bytes()).hexdigest()
    assert hashlib.sha256(objects["registry/tiny-neo/v1/model.safetensors"]).hexdigest() == \
        files["model.safetensors"]["sha256"]
    assert manifest["lineage"]["pipeline_run_id"] and manifest["lineage"]["dataset_hash"]


STEP_SCRIPT = """
import sys
from kfp import dsl, local
from llmneo_components.images import IMAGE
from llmneo_pipelines import container_run

@dsl.component(base_image=IMAGE, install_kfp_package=False)
def step(code: int) -> int:
    import sys
    print("step exits with", code)
    if code:
        sys.exit(code)
    return code

@dsl.pipeline(name="one-step")
def one_step(code: int):
    step(code=code)

container_run.install(__import__("pathlib").Path(sys.argv[2]))
local.init(runner=local.DockerRunner(), pipeline_root=sys.argv[2], raise_on_error=True)
one_step(code=int(sys.argv[1]))
print("RUN SUCCEEDED")
"""


@pytest.mark.parametrize("code", [0, 3])
def test_a_failing_step_fails_the_run(engine, tmp_path, code):
    script = tmp_path / "one_step.py"
    script.write_text(textwrap.dedent(STEP_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(code), str(tmp_path / "root")],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert f"step exits with {code}" in out  # it really ran in the container
    if code:
        assert proc.returncode != 0 and "RUN SUCCEEDED" not in out, out[-3000:]
        assert "FAILURE" in out, out[-3000:]
    else:
        assert proc.returncode == 0 and "RUN SUCCEEDED" in out, out[-3000:]
    if shutil.which("podman"):  # the container and its anonymous /cache volume are gone
        assert not subprocess.run(["podman", "ps", "-aq", "--filter", f"ancestor={IMAGE}"],
                                  capture_output=True, text=True).stdout.strip()
