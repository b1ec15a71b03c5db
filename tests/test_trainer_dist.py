"""Real torchrun (gloo, 2 CPU processes): DDP = one process at the same global batch; FSDP2 trains,
writes sharded checkpoints and resumes exactly; SIGTERM through `llmneo distill` → checkpoint →
re-run resumes to the same weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_workdir, run

from llmneo.cards import DistillCard
from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.steps import distill_student

pytestmark = pytest.mark.integration

NEO = ["distill.max_steps=10", "distill.save_every=0"]
KD = ["distill.method=kd", "distill.max_steps=4"]


def distill(ws, out, overrides):
    return distill_student(load_config("tiny", overrides), ws / "dataset", ws / "teacher", ws / "student", out)


def log(workdir):
    return [json.loads(x) for x in (workdir / "train_log.jsonl").read_text().splitlines()]


def in_process(ws, out, overrides):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(make_workdir(out, ws, *overrides))
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def ddp_neo(tiny_workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    card = distill(tiny_workspace, out, NEO + ["distill.strategy=ddp"])
    return out, card


def test_ddp_two_processes_equal_one_process(ddp_neo, tiny_workspace, tmp_path):
    out, card = ddp_neo
    assert card.world_size == 2 and card.strategy == "ddp" and card.status == "complete"
    single = in_process(tiny_workspace, tmp_path, NEO)
    for a, b in zip(log(out), log(single), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"]
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in b:  # the validation loss, summed over both ranks' micro-batches
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    assert [r["step"] for r in log(out) if "val_loss" in r] == [2, 4, 6, 8, 10]  # tiny: eval_every 2
    two, one = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, single))
    assert set(two) == set(one)
    for key in one:
        assert torch.allclose(two[key], one[key], atol=1e-6), key
    assert any(float(v.abs().max()) > 1e-4 for k, v in one.items() if "lora_B" in k)


def test_fsdp2_trains_shards_checkpoints_and_resumes(tiny_workspace, tmp_path):
    overrides = KD + ["distill.strategy=fsdp", "distill.save_every=2", "distill.keep_checkpoint=true",
                      "distill.activation_checkpointing=true"]
    out = tmp_path / "fsdp"
    card = distill(tiny_workspace, out, overrides)
    assert card.strategy == "fsdp" and card.world_size == 2
    # the shards gathered into one state file (safetensors: nothing to unpickle), an RNG file per rank
    step2 = out / "checkpoint" / "step-000002"
    assert sorted(p.relative_to(step2).as_posix() for p in step2.rglob("*") if p.is_file()) == [
        "manifest.json", "rng/rank-00000.safetensors", "rng/rank-00001.safetensors", "state.safetensors",
        "trainer_state.json"]
    fsdp_weights = load_file(out / "model" / "model.safetensors")
    single = load_file(in_process(tiny_workspace, tmp_path / "one", KD) / "model" / "model.safetensors")
    base = load_file(tiny_workspace / "student" / "model.safetensors")
    for key, value in single.items():
        assert torch.allclose(fsdp_weights[key], value, atol=1e-5), key
        assert not torch.equal(value, base[key]) or key == "model.embed_tokens.weight"

    # resume from the sharded step-2 checkpoint: steps 3-4 again give bit-identical weights
    (out / "card.json").unlink()
    (out / "model" / "model.safetensors").unlink()
    card = distill(tiny_workspace, out, overrides)
    assert card.resumed_from_step == 2
    resumed = load_file(out / "model" / "model.safetensors")
    for key, value in fsdp_weights.items():
        assert torch.equal(resumed[key], value), key


def test_fsdp_validation_with_micro_batches_that_do_not_split_evenly_equals_one_process(tiny_workspace, tmp_path):
    """11 val rows in micro-batches of 4: 3 batches over 2 ranks. The rank with fewer runs a dummy
    forward (FSDP all-gathers in every forward: unequal counts would hang) and does not count it."""
    overrides = ["distill.method=kd", "distill.max_steps=1", "distill.eval_every=1", "distill.micro_batch_size=4"]
    distill(tiny_workspace, tmp_path / "fsdp", overrides + ["distill.strategy=fsdp"])
    single = in_process(tiny_workspace, tmp_path / "one", overrides)
    ((two,), (one,)) = (log(tmp_path / "fsdp"), log(single))
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5) and two["val_kd"] > 0


def test_sigterm_through_the_cli_then_rerun_resumes_to_the_same_weights(ddp_neo, tiny_workspace, tmp_path):
    reference, _ = ddp_neo
    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "llmneo.cli", "distill", "--preset", "tiny",
           "--dataset", str(tiny_workspace / "dataset"), "--teacher", str(tiny_workspace / "teacher"),
           "--student", str(tiny_workspace / "student"), "--out", str(out), *NEO, "distill.strategy=ddp"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "train_log.jsonl").is_file() and (out / "train_log.jsonl").read_text().strip():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what Kubernetes does to the step's pod on preemption
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr and "re-running the step resumes" in stderr
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    assert not (out / "card.json").exists()
    stopped_at = int((out / "checkpoint" / "latest").read_text().strip().removeprefix("step-"))
    assert 1 <= stopped_at < 10, "the run finished before the signal arrived: nothing was tested"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = DistillCard.read(out)
    assert card.resumed_from_step == stopped_at
    assert [r["step"] for r in log(out)] == list(range(1, 11))
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(reference)]
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, reference))
    for key in b:
        assert torch.equal(a[key], b[key]), key


def test_batch_that_does_not_split_over_ranks_is_a_user_error(tiny_workspace, tmp_path):
    with pytest.raises(UserError, match=r"distill.global_batch_size=6 must be a multiple of world size \(2\)"):
        distill(tiny_workspace, tmp_path, ["distill.global_batch_size=6", "distill.micro_batch_size=2",
                                           "distill.max_steps=1"])


RETRY_SCRIPT = """
import sys
from kfp import dsl
from llmneo_components.distill import distill
ws, out, cache, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
art = {}
for name, path in [("dataset", ws + "/dataset"), ("teacher", ws + "/teacher"), ("student", ws + "/student"),
                   ("adapter", out)]:
    art[name] = dsl.Model(uri=path)
    art[name].path = path
distill.python_func(preset="tiny", overrides=overrides, config="", gpus="0", nodes=1, dataset=art["dataset"],
                    teacher=art["teacher"], student=art["student"], adapter=art["adapter"],
                    metrics=dsl.Metrics(uri=out + "-metrics"), checkpoints=cache + "/checkpoints")
"""


def test_a_retried_distill_task_resumes_from_the_cache_volume(ddp_neo, tiny_workspace, tmp_path):
    """KFP retries a preempted task in a new pod with a new, empty output folder: the distill
    component (real torchrun, SIGTERM as on preemption) checkpoints to the cache volume under the run
    id and the configuration's fingerprint, so the retry resumes and ends bit-for-bit equal to an
    uninterrupted run."""
    reference, _ = ddp_neo
    cache = tmp_path / "cache"
    cache.mkdir()  # the mounted volume
    overrides = [*NEO, "distill.strategy=ddp"]

    env = dict(os.environ, LLMNEO_WORKFLOW="run-42")  # the run's Argo workflow, from the pod's label

    def attempt(name):
        return [sys.executable, "-c", RETRY_SCRIPT, str(tiny_workspace), str(tmp_path / name), str(cache), *overrides]

    first = tmp_path / "attempt1"
    proc = subprocess.Popen(attempt("attempt1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (first / "train_log.jsonl").is_file() and (first / "train_log.jsonl").read_text().strip():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # Kubernetes preempts the pod
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    (keep,) = (cache / "checkpoints" / "run-42").iterdir()
    assert keep.name == load_config("tiny", [*overrides, "distill.nnodes=1"]).fingerprint()
    stopped_at = int((keep / "latest").read_text().strip().removeprefix("step-"))
    assert 1 <= stopped_at < 10, "the run finished before the signal arrived: nothing was tested"
    assert not (first / "checkpoint").exists()

    done = subprocess.run(attempt("attempt2"), capture_output=True, text=True, timeout=600, env=env)  # the retry's pod
    assert done.returncode == 0, done.stderr[-3000:]
    second = tmp_path / "attempt2"
    assert DistillCard.read(second).resumed_from_step == stopped_at
    assert [r["loss"] for r in log(second)] == [r["loss"] for r in log(reference)]
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (second, reference))
    for key in b:
        assert torch.equal(a[key], b[key]), key
    assert not keep.exists()  # a finished run leaves no checkpoint on the volume
