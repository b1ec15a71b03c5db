"""The TorchX component (llmneo/torchx_component.py): the AppDef runs the trainer's own entry, what
TorchX's kubernetes scheduler would submit is a valid Volcano Job, and `torchx run -s local_cwd`
trains the tiny preset with 2 processes (gloo) to the same numbers as `llmneo distill`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from k8s_schemas import crd_validator, errors
from safetensors.torch import load_file

from conftest import REPO
from llmneo.cards import DistillCard
from llmneo.config import load_config
from llmneo.launch import TRAINER_MODULE, TrainerInputs, write_workdir
from llmneo.torchx_component import IMAGE, distill

VOLCANO_CRD = "batch.volcano.sh_jobs.yaml"


def test_appdef_runs_the_trainer_entry_under_torchrun():
    app = distill("/cache/work/x", nnodes=2, nproc_per_node=8, gpu=8, omp_threads=4)
    (role,) = app.roles
    assert role.num_replicas == 2 and role.image == IMAGE
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    cmd = role.args[1]
    assert cmd.startswith("torchrun --rdzv_backend c10d ") and " --nnodes 2 --nproc_per_node 8 " in cmd
    assert cmd.endswith(f" -m {TRAINER_MODULE} --workdir /cache/work/x")  # = llmneo.launch.torchrun_command's entry
    assert role.env["OMP_NUM_THREADS"] == "4" and role.resource.gpu == 8


def test_default_image_is_the_pipelines_image():
    from llmneo_components.images import DEFAULT_IMAGE

    assert IMAGE == DEFAULT_IMAGE


def test_kubernetes_dryrun_is_a_valid_volcano_job():
    """TorchX 0.7.0's kubernetes scheduler submits a Volcano Job (batch.volcano.sh/v1alpha1): the
    dry run's request, serialized as the Kubernetes client sends it, validates against the Volcano
    CRD's schema (closed objects: a misspelt field fails), one task per node, all scheduled together."""
    from kubernetes.client import ApiClient
    from torchx.runner import get_runner

    app = distill("/cache/work/x", nnodes=2, nproc_per_node=8, gpu=8,
                  mounts=["type=volume", "src=llmneo-cache", "dst=/cache"])
    with get_runner() as runner:
        info = runner.dryrun(app, "kubernetes", cfg={"queue": "default", "namespace": "team-a"})
    job = ApiClient().sanitize_for_serialization(info.request.resource)
    assert errors(crd_validator(VOLCANO_CRD, "v1alpha1"), job) == []
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    spec = job["spec"]
    assert spec["queue"] == "default" and spec["schedulerName"] == "volcano"
    assert [t["replicas"] for t in spec["tasks"]] == [1, 1]
    for task in spec["tasks"]:
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"][-1].endswith(f"-m {TRAINER_MODULE} --workdir /cache/work/x")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"mountPath": "/cache", "name": "mount-0", "readOnly": False} in container["volumeMounts"]
        assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "llmneo-cache"}} in pod["volumes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_torchx_local_cwd_trains_the_tiny_preset(tiny_workspace, tmp_path):
    from llmneo.steps import distill_student

    overrides = ["distill.max_steps=3", "distill.save_every=0", "distill.nproc_per_node=2"]
    cfg = load_config("tiny", overrides)
    inputs = TrainerInputs.of(tiny_workspace / "dataset", tiny_workspace / "teacher", tiny_workspace / "student")
    workdir = write_workdir(tmp_path / "torchx", cfg, inputs)
    # ddp's command line calls `torchrun` from PATH: this interpreter's, whatever the venv's bin holds
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
                           "llmneo/torchx_component.py:distill",
                           "--workdir", str(workdir), "--nproc_per_node", "2", "--rdzv_port", str(free_port())],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    card = DistillCard.read(workdir)
    assert card.steps == 3 and card.method == "neo"

    reference = tmp_path / "llmneo"  # the same configuration through llmneo's own torchrun
    distill_student(cfg, *(Path(p) for p in (inputs.dataset, inputs.teacher, inputs.student)), reference)
    assert [r["loss"] for r in log(workdir)] == [r["loss"] for r in log(reference)]
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (workdir, reference))
    for key in b:
        assert torch.equal(a[key], b[key]), key
