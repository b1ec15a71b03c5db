"""Faults and attacks on training, reproduced: a pickle planted in a checkpoint, corrupt checkpoints
(truncated shard, garbage DCP metadata, bad trainer state), NaN inside a checkpoint tensor or a batch,
a completed run replaced by another configuration, and a launcher killed with kill -9. Each test
checks that nothing is lost (resume equals an uninterrupted run), nothing foreign runs and nothing
is written that should not be (no card for a failed run)."""

import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_trainer import log, make_workdir, run, sigterm_after

from llmneo import checkpointing
from llmneo.cards import DistillCard
from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.launch import output_lock
from llmneo.steps import distill_student
from llmneo.trainer import DistillTrainer, NonFiniteTraining, Preempted, main

# dropout: the RNG state must be restored too for a bit-identical resume
R = ("distill.max_steps=4", "distill.save_every=1", "distill.lora_dropout=0.1")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def reference(tiny_workspace, tmp_path_factory):
    """The uninterrupted run every resumed run must equal bit for bit."""
    workdir = make_workdir(tmp_path_factory.mktemp("ref"), tiny_workspace, *R)
    run(workdir)
    return workdir


def interrupted(path: Path, ws: Path, after: int, *extra: str) -> Path:
    """A run stopped by a real SIGTERM after step ``after``: checkpoints of steps after-1 and after."""
    workdir = make_workdir(path, ws, *R, *extra)
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    sigterm_after(trainer, after)
    with pytest.raises(Preempted):
        trainer.train()
    trainer.cleanup()
    return workdir


def adapter(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(workdir / "adapter" / "adapter_model.safetensors")


def assert_equals_reference(workdir: Path, reference: Path, resumed_from: int) -> None:
    assert DistillCard.read(workdir).resumed_from_step == resumed_from
    assert [r["step"] for r in log(workdir)] == [1, 2, 3, 4]
    assert [r["loss"] for r in log(workdir)] == [r["loss"] for r in log(reference)]
    ref = adapter(reference)
    for key, value in adapter(workdir).items():
        assert torch.equal(value, ref[key]), key


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------- 1. no pickle is loaded


class Payload:
    """What an attacker plants: unpickling runs ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_rng_state_is_pickle_free_and_a_planted_pickle_never_runs(reference, tiny_workspace, tmp_path, capsys):
    marker = tmp_path / "pwned"
    workdir = interrupted(tmp_path / "run", tiny_workspace, 3)
    newest = workdir / "checkpoint" / "step-000003"
    assert sorted(p.name for p in (newest / "rng").iterdir()) == ["rank-00000.safetensors"]
    assert not list(newest.rglob("*.pt"))
    # the attacker replaces the RNG file with a pickle, adds the old file name too, and fixes the manifest
    bomb = pickle.dumps(Payload(marker))
    pickle.loads(bomb)
    assert marker.exists(), "the payload itself works"
    marker.unlink()
    (newest / "rng" / "rank-00000.safetensors").write_bytes(bomb)
    (newest / "rng" / "rank-00000.pt").write_bytes(bomb)
    checkpointing.write_manifest(newest)

    run(workdir)  # falls back to step 2 and finishes
    assert not marker.exists(), "code from the checkpoint ran"
    err = capsys.readouterr().err
    assert "unreadable RNG state" in err and "rank-00000.safetensors" in err
    assert_equals_reference(workdir, reference, resumed_from=2)


def state_files(folder: Path) -> list[Path]:
    """The files of a checkpoint that hold tensors (not its JSON, not the RNG files)."""
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".json" and p.parent.name != "rng"]


def test_a_pickle_planted_in_a_checkpoint_on_the_cache_volume_never_runs(reference, tiny_workspace, tmp_path,
                                                                         capsys):
    """The pipeline's default checkpoint folder (/cache/checkpoints/<run>/<fingerprint>) is on the
    ReadWriteMany cache volume that every step and node mounts: whoever writes there plants a pickle
    in every file a checkpoint loader might open (the tensor files, DCP's ``.metadata``, a ``.pt``)
    and recomputes the manifest. Resuming opens none of them as a pickle: the planted folder is
    unreadable, resume falls back to the previous checkpoint and ends equal to an uninterrupted run."""
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache" / "checkpoints" / "run-42" / "fingerprint"
    workdir = interrupted(tmp_path / "run", tiny_workspace, 3, f"distill.checkpoint_uri={cache}")
    newest = cache / "step-000003"
    bomb = pickle.dumps(Payload(marker))
    for path in state_files(newest):
        path.write_bytes(bomb)
    for name in ("state/.metadata", "state/__0_0.distcp", "state.pt", "optimizer.pt", "rng/rank-00000.pt"):
        (newest / name).parent.mkdir(exist_ok=True)
        (newest / name).write_bytes(bomb)
    checkpointing.write_manifest(newest)
    checkpointing.verify(newest)  # gets past the integrity check
    capsys.readouterr()
    run(workdir)
    assert not marker.exists(), "code from the checkpoint ran"
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "step-000003" in warnings[0] and "unreadable" in warnings[0], warnings
    assert_equals_reference(workdir, reference, resumed_from=2)


def test_a_verified_checkpoint_that_does_not_load_falls_back_to_the_previous_one(reference, tiny_workspace,
                                                                                 tmp_path, capsys):
    """Garbage in the tensor files with a recomputed manifest: verification passes, the loader fails
    (whatever it raises), resume falls back to step 2 in one warning line and ends equal to an
    uninterrupted run."""
    workdir = interrupted(tmp_path / "run", tiny_workspace, 3)
    newest = workdir / "checkpoint" / "step-000003"
    for path in state_files(newest):
        path.write_bytes(os.urandom(64) + path.read_bytes()[64:])
    checkpointing.write_manifest(newest)
    capsys.readouterr()
    run(workdir)
    err = capsys.readouterr().err
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "step-000003" in warnings[0] and "Traceback" not in err, err
    assert_equals_reference(workdir, reference, resumed_from=2)


# ---------------------------------------------------------------------------- 2. corrupt checkpoints


def truncate_shard(folder: Path) -> None:
    state = folder / checkpointing.STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def garbage_metadata(folder: Path) -> None:
    """Random bytes over the state file's header (its JSON index of the tensors)."""
    state = folder / checkpointing.STATE
    state.write_bytes(os.urandom(512) + state.read_bytes()[512:])


def bad_trainer_state(folder: Path) -> None:
    (folder / "trainer_state.json").write_text('{"step": 3, "sched')


@pytest.mark.parametrize("corrupt", [truncate_shard, garbage_metadata, bad_trainer_state])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(corrupt, reference, tiny_workspace, tmp_path,
                                                                  capsys):
    workdir = interrupted(tmp_path / "run", tiny_workspace, 3)
    corrupt(workdir / "checkpoint" / "step-000003")
    capsys.readouterr()
    run(workdir)
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "step-000003" in warnings[0] and "step-000002" in warnings[0], warnings
    assert_equals_reference(workdir, reference, resumed_from=2)


def test_no_valid_checkpoint_is_one_line_with_the_remedy(tiny_workspace, tmp_path, capsys):
    workdir = interrupted(tmp_path / "run", tiny_workspace, 3)
    truncate_shard(workdir / "checkpoint" / "step-000003")
    bad_trainer_state(workdir / "checkpoint" / "step-000002")
    capsys.readouterr()
    assert main(["--workdir", str(workdir)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "step-000003/state.safetensors" in line and "distill.resume=false" in line
    assert not (workdir / "card.json").exists() and not (workdir / "adapter").exists()
    # the remedy works: a fresh start
    make_workdir(workdir, tiny_workspace, *R, "distill.resume=false")
    assert main(["--workdir", str(workdir)]) == 0
    assert DistillCard.read(workdir).status == "complete"


# ---------------------------------------------------------------------------- 3. non-finite training


def poison_checkpoint(folder: Path) -> None:
    """NaN into a trainable tensor (lora_B), with a manifest recomputed: verification cannot see it."""
    path = folder / checkpointing.STATE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("model/") and "lora_B" in k)
    tensors[key].fill_(float("nan"))
    save_file(tensors, str(path), metadata=metadata)
    checkpointing.write_manifest(folder)


def test_nan_in_a_checkpoint_tensor_stops_training_without_a_card(tiny_workspace, tmp_path, capsys):
    workdir = interrupted(tmp_path / "run", tiny_workspace, 2)
    poison_checkpoint(workdir / "checkpoint" / "step-000002")
    checkpointing.verify(workdir / "checkpoint" / "step-000002")  # gets past the integrity check
    capsys.readouterr()
    assert main(["--workdir", str(workdir)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite loss or gradient at step 3" in line and "distill.max_nonfinite_steps" in line
    assert not (workdir / "card.json").exists() and not (workdir / "adapter").exists()


def with_bad_batches(trainer: DistillTrainer, bad_steps: set[int]) -> None:
    """The loss of the given optimizer steps (1-based) becomes NaN, as a corrupt batch would make it."""
    current = [0]
    original_step, original_forward = trainer.train_step, trainer.module.forward

    def train_step(s):
        current[0] = s + 1
        return original_step(s)

    def forward(**batch):
        loss, ce, kd = original_forward(**batch)
        if current[0] in bad_steps:
            return loss * math.nan, ce * math.nan, kd
        return loss, ce, kd

    trainer.train_step, trainer.module.forward = train_step, forward


def test_a_bad_batch_is_skipped_when_allowed_and_counted_in_the_card(tiny_workspace, tmp_path):
    workdir = make_workdir(tmp_path / "skip", tiny_workspace, "distill.max_steps=3",
                           "distill.max_nonfinite_steps=1")
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    with_bad_batches(trainer, {2})
    before = {k: v.clone() for k, v in trainer.student.named_parameters() if v.requires_grad}
    trainer.save(trainer.train())
    trainer.cleanup()
    records = log(workdir)
    assert [r["step"] for r in records] == [1, 2, 3] and [r.get("skipped", False) for r in records] == [
        False, True, False]
    assert math.isnan(records[1]["ce"])
    card = DistillCard.read(workdir)
    assert card.status == "complete" and card.nonfinite_steps_skipped == 1
    assert all(math.isfinite(v) for v in card.final.values())
    trained = adapter(workdir)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(v, before[k]) for k, v in trainer.student.named_parameters() if k in before)

    # two bad batches with one allowed: stopped at the second
    again = DistillTrainer.from_workdir(make_workdir(tmp_path / "stop", tiny_workspace, "distill.max_steps=3",
                                                     "distill.max_nonfinite_steps=1"))
    again.setup()
    with_bad_batches(again, {1, 3})
    with pytest.raises(NonFiniteTraining, match="at step 3"):
        again.train()
    again.cleanup()


# ---------------------------------------------------------------------------- 4. replacing a completed run


def test_a_completed_run_of_another_configuration_is_kept_unless_overwrite(tiny_workspace, tmp_path, capsys):
    from llmneo.cli import main as cli

    out = tmp_path / "out"
    run(make_workdir(out, tiny_workspace, "distill.nproc_per_node=1"))
    card_before = (out / "card.json").read_bytes()
    weights_before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    folders = ["--dataset", str(tiny_workspace / "dataset"), "--teacher", str(tiny_workspace / "teacher"),
               "--student", str(tiny_workspace / "student"), "--out", str(out)]
    with pytest.raises(SystemExit) as info:
        cli(["distill", *folders, "distill.max_steps=2", "distill.save_every=0", "distill.alpha=0.9"])
    assert info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds a completed distill run of another configuration" in line and "--overwrite" in line
    assert (out / "card.json").read_bytes() == card_before
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights_before


@pytest.mark.integration
def test_same_configuration_is_a_no_op_and_overwrite_replaces(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    base = ["distill.max_steps=2", "distill.save_every=0", "distill.nproc_per_node=1"]
    run(make_workdir(out, tiny_workspace, *base))
    first = DistillCard.read(out)
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    def distill(*overrides, **kw):
        return distill_student(load_config("tiny", [*base, *overrides]), tiny_workspace / "dataset",
                               tiny_workspace / "teacher", tiny_workspace / "student", out, **kw)

    assert distill().config_hash == first.config_hash  # a KFP retry of a finished step: nothing redone
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights
    card = distill("distill.alpha=0.9", overwrite=True)
    assert card.status == "complete" and card.config_hash != first.config_hash and card.alpha == 0.9
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != weights


# ---------------------------------------------------------------------------- real torchrun (2 processes)


def cli_distill(ws: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "llmneo.cli", "distill", "--preset", "tiny", "--dataset", str(ws / "dataset"),
            "--teacher", str(ws / "teacher"), "--student", str(ws / "student"), "--out", str(out), *overrides]


def trained_ddp(tiny_workspace, tmp_path) -> tuple[Path, list[str]]:
    """A 4-step DDP run through the CLI (torchrun) that keeps a checkpoint of every step but the last."""
    overrides = ["distill.max_steps=4", "distill.save_every=1", "distill.keep_checkpoint=true",
                 "distill.strategy=ddp"]
    out = tmp_path / "ddp"
    done = subprocess.run(cli_distill(tiny_workspace, out, *overrides), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, overrides


@pytest.mark.integration
def test_a_nan_stop_through_torchrun_is_one_line_without_a_resume_hint(tiny_workspace, tmp_path):
    """The trainer stops on a non-finite loss (a NaN planted in the checkpoint it resumes): the CLI
    prints the trainer's one line, no torchrun traceback (ChildFailedError) and no "re-running
    resumes from it" (a re-run would stop the same way)."""
    out, overrides = trained_ddp(tiny_workspace, tmp_path)
    root = out / "checkpoint"
    (out / "card.json").unlink()
    newest = checkpointing.candidates(root)[0]  # the last step is not checkpointed: step 3
    poison_checkpoint(newest)
    failed = subprocess.run(cli_distill(tiny_workspace, out, *overrides), capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    line = one_error_line(failed.stderr)
    assert f"non-finite loss or gradient at step {checkpointing.step_of(newest) + 1}" in line, line
    assert "ChildFailedError" not in failed.stderr and "resumes from it" not in failed.stderr, failed.stderr[-3000:]
    assert not (out / "card.json").exists()


@pytest.mark.integration
def test_torchrun_falls_back_past_a_truncated_shard_and_stops_in_one_line_when_none_is_valid(tiny_workspace,
                                                                                           tmp_path):
    out, overrides = trained_ddp(tiny_workspace, tmp_path)
    root = out / "checkpoint"
    assert [p.name for p in checkpointing.candidates(root)] == ["step-000003", "step-000002"]
    reference = adapter(out)
    # a preempted attempt whose newest checkpoint got truncated (e.g. the node died while it was copied)
    (out / "card.json").unlink()
    (out / "adapter" / "adapter_model.safetensors").unlink()
    truncate_shard(root / "step-000003")
    again = subprocess.run(cli_distill(tiny_workspace, out, *overrides), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    warnings = [x for x in again.stderr.splitlines() if "warning" in x and "step-000003" in x]
    assert len(warnings) == 1 and "(truncated?)" in warnings[0], again.stderr[-3000:]
    assert DistillCard.read(out).resumed_from_step == 2
    for key, value in adapter(out).items():
        assert torch.equal(value, reference[key]), key

    # every checkpoint corrupt: one line, exit 2, torchrun not even started, nothing written
    (out / "card.json").unlink()
    for folder in checkpointing.candidates(root):
        garbage_metadata(folder)
    failed = subprocess.run(cli_distill(tiny_workspace, out, *overrides), capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2
    line = one_error_line(failed.stderr)
    assert "state.safetensors" in line and "distill.resume=false" in line
    assert "llmneo.torchrun" not in failed.stderr and not (out / "card.json").exists()


# ---------------------------------------------------------------------------- kill -9 of the launcher


@pytest.mark.integration
def test_kill_9_of_the_launcher_ends_torchrun_and_workers_and_the_lock_refuses_a_second_run(tiny_workspace,
                                                                                          tmp_path):
    import psutil

    out = tmp_path / "out"
    cmd = cli_distill(tiny_workspace, out, "distill.max_steps=100000", "distill.save_every=0",
                      "distill.strategy=ddp")
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    children: list = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and launcher.poll() is None:
            if (out / "train_log.jsonl").is_file() and (out / "train_log.jsonl").read_text().strip():
                break
            time.sleep(0.1)
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) >= 3  # torchrun and its two trainers

        # a second run into the same folder, meanwhile: refused, naming the running one
        with pytest.raises(UserError, match=f"in use by pid {launcher.pid}") as info:
            distill_student(load_config("tiny", ["distill.max_steps=2"]), tiny_workspace / "dataset",
                            tiny_workspace / "teacher", tiny_workspace / "student", out)
        assert "\n" not in str(info.value)
        assert not (out / "card.json").exists()

        t0 = time.time()
        launcher.kill()  # kill -9: no handler runs in the launcher
        launcher.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=30)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"orphans still running: {[p.cmdline() for p in alive]}"
        print(f"torchrun and trainers gone {time.time() - t0:.1f} s after kill -9 of the launcher")
    finally:
        for p in children:
            if p.is_running():
                p.kill()
        if launcher.poll() is None:
            launcher.kill()
    # torchrun passed the kernel's SIGTERM to the trainers: they checkpointed (nothing lost) and the lock is free
    assert checkpointing.latest(out / "checkpoint") is not None
    with output_lock(out):
        pass
