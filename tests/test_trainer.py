"""The distill trainer, in process (one rank, CPU): which parameters each method trains, offline top-k
teacher = online teacher, checkpoint/resume after a real SIGTERM, observability outputs.
Multi-process runs (DDP, FSDP2, torchrun + SIGTERM) are in test_trainer_dist.py."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmneo import checkpointing
from llmneo.cards import DistillCard
from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.launch import TrainerInputs, write_workdir
from llmneo.trainer import DistillTrainer, Preempted, count_targets, lr_lambda, main, progress_postfix

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_workdir(path: Path, ws: Path, *overrides: str, teacher: Path | None = None) -> Path:
    cfg = load_config("tiny", ["distill.max_steps=2", "distill.save_every=0", *overrides])
    return write_workdir(path, cfg, TrainerInputs.of(ws / "dataset", teacher or ws / "teacher", ws / "student"))


def run(workdir: Path) -> DistillTrainer:
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    trainer.save(trainer.train())
    trainer.cleanup()
    return trainer


def log(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "train_log.jsonl").read_text().splitlines()]


def adapter(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(workdir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def neo_run(tiny_workspace, tmp_path_factory):
    """The reference: neo, 2 steps, chunked loss, online teacher."""
    workdir = make_workdir(tmp_path_factory.mktemp("neo"), tiny_workspace)
    return workdir, run(workdir)


# ---------------------------------------------------------------------------- what each method trains


@pytest.mark.parametrize("method", ["sft", "lora", "kd", "neo"])
def test_methods_train_the_right_parameters(method, tiny_workspace, tmp_path):
    base = load_file(tiny_workspace / "student" / "model.safetensors")
    workdir = make_workdir(tmp_path, tiny_workspace, f"distill.method={method}")
    trainer = run(workdir)
    card = DistillCard.read(workdir)
    uses_teacher = method in ("kd", "neo")
    assert (trainer.teacher is not None) == uses_teacher
    assert all(r["kd"] > 0 for r in log(workdir)) == uses_teacher
    if method in ("lora", "neo"):
        names = [n for n, p in trainer.student.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        assert not (workdir / "model").exists()
        trained = adapter(workdir)
        assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)  # B left zero
        now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in trainer.student.state_dict().items() if "lora_" not in k}
        assert set(now) == set(base)
        for key, value in base.items():
            assert torch.equal(now[key], value), f"{key}: the frozen base changed"
        assert card.trainable_parameters == sum(v.numel() for v in trained.values())
    else:
        assert not (workdir / "adapter").exists()
        trained = load_file(workdir / "model" / "model.safetensors")
        assert set(trained) == set(base)
        for key, value in base.items():
            if key == "model.embed_tokens.weight":  # rows of tokens absent from the batches stay put
                assert not torch.equal(trained[key], value)
            else:
                assert not torch.allclose(trained[key], value), f"{key} did not train"
        assert card.trainable_parameters == sum(v.numel() for v in base.values())


def test_teacher_equal_to_student_gives_zero_kd_and_zero_gradient(tiny_workspace, tmp_path):
    """KD and the student read the same next-token positions: an identical teacher gives KD = 0 exactly."""
    workdir = make_workdir(tmp_path, tiny_workspace, "distill.method=kd", "distill.alpha=1.0",
                           "distill.max_steps=1", teacher=tiny_workspace / "student")
    run(workdir)
    (record,) = log(workdir)
    assert abs(record["kd"]) < 1e-6 and record["grad_norm"] < 1e-5 and record["ce"] > 1


# ---------------------------------------------------------------------------- loss implementations


@pytest.mark.parametrize("override", ["distill.loss_impl=naive", "distill.activation_checkpointing=true",
                                      "distill.loss_chunk_tokens=7"])
def test_same_numbers_with_other_memory_settings(override, neo_run, tiny_workspace, tmp_path):
    ref_dir, _ = neo_run
    workdir = make_workdir(tmp_path, tiny_workspace, override)
    run(workdir)
    for a, b in zip(log(workdir), log(ref_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kd"] == pytest.approx(b["kd"], rel=1e-4)
    ref = adapter(ref_dir)
    # Adam divides by sqrt(v): on near-zero gradients (lora_A while B is still ~0) float round-off
    # of a different summation order is amplified up to a fraction of one step (lr = 1e-3), so the
    # weights agree to 1e-4 while the losses above agree to 1e-5 relative.
    for key, value in adapter(workdir).items():
        assert torch.allclose(value, ref[key], atol=1e-4), (key, float((value - ref[key]).abs().max()))


def test_bf16_autocast_and_bf16_teacher_as_on_gpu(neo_run, tiny_workspace, tmp_path):
    """The GPU numerics (bf16 autocast, bf16 teacher, fp32 master weights) run here on CPU too."""
    ref_dir, _ = neo_run
    workdir = make_workdir(tmp_path, tiny_workspace, "distill.precision=bf16", "teacher.dtype=bfloat16")
    trainer = run(workdir)
    assert trainer.teacher.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.trainable)  # master weights stay fp32
    frozen = [p for p in trainer.student.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # frozen_dtype=auto under bf16
    for a, b in zip(log(workdir), log(ref_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2) and a["kd"] == pytest.approx(b["kd"], rel=0.2)
    assert all(torch.isfinite(v).all() for v in adapter(workdir).values())


def test_frozen_base_stays_fp32_when_asked_and_in_fp32_training(neo_run, tiny_workspace, tmp_path):
    """frozen_dtype=fp32 under bf16 keeps the base fp32; fp32 training (the CPU default) never casts it."""
    _, ref = neo_run
    assert all(p.dtype == torch.float32 for p in ref.student.parameters())
    workdir = make_workdir(tmp_path, tiny_workspace, "distill.precision=bf16", "distill.frozen_dtype=fp32",
                           "distill.max_steps=1")
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    trainer.cleanup()


# ---------------------------------------------------------------------------- packed rows


@pytest.mark.parametrize("loss_impl", ["chunked", "naive"])
def test_packed_row_loss_equals_the_separate_examples(loss_impl, tiny_workspace):
    """A packed row (position_ids restarting per example, no attention mask) gives the same CE and KD
    sums as its examples one by one: no token attends across an example boundary."""
    from llmneo.data import collate, read_split
    from llmneo.losses import LossSpec
    from llmneo.models import load_causal_lm
    from llmneo.signals import OnlineTeacher
    from llmneo.trainer import DistillModule

    cfg = load_config("tiny", [f"distill.loss_impl={loss_impl}"])
    examples = read_split(tiny_workspace / "dataset", "train")[:3]
    packed = {"input_ids": sum((r["input_ids"] for r in examples), []),
              "labels": sum(([-100] + r["labels"][1:] for r in examples), []),  # as data prep packs them
              "position_ids": sum((list(range(len(r["input_ids"]))) for r in examples), [])}
    module = DistillModule(load_causal_lm(tiny_workspace / "student").eval(), LossSpec.from_config(cfg.distill))
    module.set_signal(OnlineTeacher(load_causal_lm(tiny_workspace / "teacher").eval()))
    with torch.no_grad():
        together = module(**collate([packed, {**packed, "input_ids": packed["input_ids"][:40],
                                              "labels": packed["labels"][:40],
                                              "position_ids": packed["position_ids"][:40]}], pad_id=0))
        first_row_only = module(**collate([packed], pad_id=0))
        apart = [module(**collate([r], pad_id=0)) for r in examples]
    for i in (1, 2):  # ce, kd
        assert float(first_row_only[i]) == pytest.approx(sum(float(a[i]) for a in apart), rel=1e-5)
        assert float(together[i]) > float(first_row_only[i])  # the padded second row adds its own tokens


# ---------------------------------------------------------------------------- offline teacher


def write_full_vocab_cache(ws: Path, teacher_out: Path) -> None:
    """The teacher step itself (teacher.mode=offline) writes a cache with k = V of the tiny teacher:
    production (llmneo.teacher/topk) and consumption (the trainer) meet here."""
    from llmneo.steps import load_teacher

    cfg = load_config("tiny", ["teacher.mode=offline", "teacher.topk=100000"])  # k is capped at V
    card = load_teacher(cfg, ws / "dataset", teacher_out, teacher_out.parent / "student-unused")
    assert card.teacher.topk["k"] == card.student.vocab_size


def test_offline_topk_cache_with_k_equal_vocab_trains_like_the_online_teacher(neo_run, tiny_workspace, tmp_path):
    ref_dir, _ = neo_run
    teacher_copy = tmp_path / "teacher"
    write_full_vocab_cache(tiny_workspace, teacher_copy)
    workdir = make_workdir(tmp_path / "offline", tiny_workspace, "teacher.mode=offline", teacher=teacher_copy)
    trainer = run(workdir)
    assert trainer.teacher is None and trainer.topk is not None  # no teacher model was loaded
    for a, b in zip(log(workdir), log(ref_dir), strict=True):
        assert a["kd"] == pytest.approx(b["kd"], rel=2e-3)  # fp16 log-probs in the cache
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4)
    card = DistillCard.read(workdir)
    assert card.teacher_mode == "offline" and card.topk_tail == "tail"
    # the cache holds the train split only: the validation loss is the CE alone
    (val,) = card.val_history
    assert val["val_loss"] == val["val_ce"] and "val_kd" not in val
    assert val["val_ce"] == pytest.approx(log(ref_dir)[-1]["val_ce"], rel=1e-4)


def test_offline_without_a_cache_is_a_one_line_user_error(tiny_workspace, tmp_path):
    workdir = make_workdir(tmp_path, tiny_workspace, "teacher.mode=offline")
    with pytest.raises(UserError, match=r"teacher.mode=offline: no top-k cache in .*topk") as info:
        DistillTrainer.from_workdir(workdir).setup()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- checkpoint / resume


def sigterm_after(trainer: DistillTrainer, step: int) -> None:
    """Deliver a real SIGTERM to this process right after optimizer step ``step``."""
    original = trainer.train_step

    def train_step(s):
        record = original(s)
        if s + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    trainer.train_step = train_step


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tiny_workspace, tmp_path):
    overrides = ("distill.max_steps=5", "distill.lora_dropout=0.1")  # dropout: RNG state must resume too
    ref_dir = make_workdir(tmp_path / "ref", tiny_workspace, *overrides)
    run(ref_dir)

    workdir = make_workdir(tmp_path / "cut", tiny_workspace, *overrides)
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    sigterm_after(trainer, 2)
    with pytest.raises(Preempted) as info:
        trainer.train()
    trainer.cleanup()
    assert info.value.signum == signal.SIGTERM and info.value.step == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert (workdir / "checkpoint" / "latest").read_text().strip() == "step-000002"
    assert not (workdir / "card.json").exists()

    resumed = run(workdir)
    assert resumed.resumed_from == 2
    assert [r["step"] for r in log(workdir)] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in log(workdir)] == [r["loss"] for r in log(ref_dir)]
    ref = adapter(ref_dir)
    for key, value in adapter(workdir).items():
        assert torch.equal(value, ref[key]), key
    assert not (workdir / "checkpoint").exists()  # removed after success (distill.keep_checkpoint=false)


def test_a_fresh_output_folder_resumes_from_checkpoint_uri(tiny_workspace, tmp_path):
    """A retried KFP task gets a new, empty output folder (a per-pod emptyDir, uploaded only on
    success): its checkpoints must live elsewhere (distill.checkpoint_uri, e.g. on the cache volume)."""
    overrides = ("distill.max_steps=4", "distill.lora_dropout=0.1")
    ref_dir = make_workdir(tmp_path / "ref", tiny_workspace, *overrides)
    run(ref_dir)
    keep = tmp_path / "cache" / "checkpoints" / "run-1" / "fp"
    first = make_workdir(tmp_path / "attempt1", tiny_workspace, *overrides, f"distill.checkpoint_uri={keep}")
    trainer = DistillTrainer.from_workdir(first)
    trainer.setup()
    sigterm_after(trainer, 3)
    with pytest.raises(Preempted):
        trainer.train()
    trainer.cleanup()
    assert (keep / "latest").read_text().strip() == "step-000003" and not (first / "checkpoint").exists()

    second = make_workdir(tmp_path / "attempt2", tiny_workspace, *overrides, f"distill.checkpoint_uri={keep}")
    resumed = run(second)
    assert resumed.resumed_from == 3 and DistillCard.read(second).resumed_from_step == 3
    assert [r["loss"] for r in log(second)] == [r["loss"] for r in log(ref_dir)]
    ref = adapter(ref_dir)
    for key, value in adapter(second).items():
        assert torch.equal(value, ref[key]), key
    assert not keep.exists()  # removed after success (distill.keep_checkpoint=false)


def test_checkpoint_uri_is_a_folder_not_a_uri():
    with pytest.raises(UserError, match=r"^distill.checkpoint_uri: must be a folder"):
        load_config("tiny", ["distill.checkpoint_uri=s3://b/ckpt"])


def test_resume_refuses_a_checkpoint_of_another_configuration(tiny_workspace, tmp_path):
    workdir = make_workdir(tmp_path, tiny_workspace, "distill.max_steps=3")
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    sigterm_after(trainer, 1)
    with pytest.raises(Preempted):
        trainer.train()
    make_workdir(tmp_path, tiny_workspace, "distill.max_steps=3", "distill.alpha=0.9")
    with pytest.raises(UserError, match="checkpoint of a different configuration"):
        DistillTrainer.from_workdir(workdir).setup()
    make_workdir(tmp_path, tiny_workspace, "distill.max_steps=3", "distill.alpha=0.9", "distill.resume=false")
    assert DistillTrainer.from_workdir(workdir).already_complete() is False


def test_periodic_checkpoints_keep_the_newest_two(tiny_workspace, tmp_path):
    workdir = make_workdir(tmp_path, tiny_workspace, "distill.max_steps=7", "distill.save_every=2",
                           "distill.keep_checkpoint=true", "distill.method=kd")
    run(workdir)
    root = workdir / "checkpoint"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000006"]
    for step in (4, 6):  # each with a manifest of all its files, which verifies
        files = json.loads((root / f"step-00000{step}" / "manifest.json").read_text())["files"]
        assert set(files) == {"trainer_state.json", "rng/rank-00000.safetensors", "state.safetensors"}
        assert checkpointing.verify(root / f"step-00000{step}")["step"] == step
    state = json.loads((root / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"]["rows_consumed"] == 32
    assert [r["step"] for r in state["history"]] == [1, 2, 3, 4]


def test_a_complete_run_is_not_redone(neo_run, capsys):
    workdir, _ = neo_run
    before = (workdir / "card.json").stat().st_mtime_ns
    assert main(["--workdir", str(workdir)]) == 0
    assert "already holds a complete run" in capsys.readouterr().err
    assert (workdir / "card.json").stat().st_mtime_ns == before
    fresh = DistillTrainer.from_workdir(workdir)
    assert fresh.already_complete()
    fresh.d.resume = False  # distill.resume=false: train again
    assert not fresh.already_complete()


# ---------------------------------------------------------------------------- observability


def test_log_tensorboard_plot_and_card(neo_run):
    workdir, _ = neo_run
    records = log(workdir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"step", "ce", "kd", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(r)
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-9)
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and math.isfinite(r["grad_norm"])
    assert records[0]["lr"] == pytest.approx(1e-3 * lr_lambda(0, 2, 0.1))
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    card = DistillCard.read(workdir)
    assert card.status == "complete" and card.method == "neo" and card.steps == 2
    assert card.final["loss"] == records[-1]["loss"]


def test_validation_loss_is_the_training_loss_on_the_val_rows(tiny_workspace, tmp_path):
    """eval_every=1 on a 1-step run: the logged val_loss equals the reference loss (naive, full logits)
    of the trained student and the teacher on all val rows in one batch."""
    from llmneo.data import collate, read_split
    from llmneo.losses import LossSpec, distill_loss

    workdir = make_workdir(tmp_path, tiny_workspace, "distill.max_steps=1", "distill.eval_every=1")
    trainer = run(workdir)
    (record,) = log(workdir)
    rows = read_split(tiny_workspace / "dataset", "val")
    batch = collate(rows, trainer.pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    trainer.student.eval()
    with torch.no_grad():
        sums = distill_loss(trainer.student(**inputs).logits, batch["labels"], trainer.teacher(**inputs).logits,
                            LossSpec.from_config(trainer.d))
    n = count_targets(rows)
    assert n > 0 and len(rows) > trainer.d.micro_batch_size  # several micro-batches were summed
    assert record["val_loss"] == pytest.approx(float(sums.loss) / n, rel=1e-5)
    assert record["val_ce"] == pytest.approx(float(sums.ce) / n, rel=1e-5)
    assert record["val_kd"] == pytest.approx(float(sums.kd) / n, rel=1e-4)
    card = DistillCard.read(workdir)
    assert card.val_loss == record["val_loss"]
    assert card.val_history == [{k: record[k] for k in ("step", "val_loss", "val_ce", "val_kd")}]
    assert "val loss" in card.summary_line()


def test_eval_every_validates_at_its_steps_and_the_last(tiny_workspace, tmp_path):
    workdir = make_workdir(tmp_path, tiny_workspace, "distill.method=lora", "distill.max_steps=5",
                           "distill.eval_every=2", "distill.log_every=4")
    run(workdir)
    records = log(workdir)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]
    assert [r["step"] for r in records] == [2, 4, 5]  # log_every=4, plus validations and the last
    assert all(r["val_loss"] == r["val_ce"] and "val_kd" not in r for r in records)  # lora: no teacher
    assert [v["step"] for v in DistillCard.read(workdir).val_history] == [2, 4, 5]


def test_epochs_decide_the_number_of_steps(tiny_workspace, tmp_path, capsys):
    workdir = make_workdir(tmp_path, tiny_workspace, "distill.max_steps=0", "distill.epochs=0.3",
                           "distill.eval_every=0")
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    rows = len(trainer.train_rows)
    assert trainer.max_steps == math.ceil(0.3 * rows / 8)
    assert f"{trainer.max_steps} steps × 8 sequences = {trainer.max_steps * 8 / rows:.2f} epochs of {rows} " \
           "train rows" in capsys.readouterr().err
    trainer.save(trainer.train())
    trainer.cleanup()
    assert len(log(workdir)) == trainer.max_steps == DistillCard.read(workdir).steps
    assert log(workdir)[0]["lr"] == pytest.approx(1e-3 * lr_lambda(0, trainer.max_steps, 0.1))


def test_progress_postfix_shows_only_the_terms_that_exist():
    record = {"loss": 3.14159, "ce": 6.25, "kd": 0.0312, "lr": 2e-4, "tokens_per_s": 1234.5}
    assert progress_postfix(record, with_teacher=False) == {"loss": "3.142", "lr": "2.00e-04", "tok/s": "1234"}
    assert progress_postfix({**record, "val_loss": 2.5}, with_teacher=True) == {
        "loss": "3.142", "ce": "6.250", "kd": "0.031", "val": "2.500", "lr": "2.00e-04", "tok/s": "1234"}


@pytest.mark.parametrize("method, terms", [("lora", ["loss", "lr", "tok/s"]),
                                           ("neo", ["loss", "ce", "kd", "lr", "tok/s"])])
def test_progress_bar_names_the_pipeline_step(method, terms, tiny_workspace, tmp_path, monkeypatch, capsys):
    from llmneo.launch import STEP_LABEL_ENV

    monkeypatch.setenv(STEP_LABEL_ENV, "3/5 distill")
    run(make_workdir(tmp_path, tiny_workspace, f"distill.method={method}", "distill.max_steps=1",
                     "distill.eval_every=0"))
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"[3/5 distill] {method}: 100%")
    postfix = last.rsplit(", ", len(terms))[1:]
    assert [item.split("=")[0] for item in postfix] == terms


def test_cosine_schedule_with_warmup():
    values = [lr_lambda(s, 20, 0.1) for s in range(20)]
    assert values[:2] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]  # 2 warmup steps
    assert values[2] == 1.0 and values[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 17 / 18)))
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))


# ---------------------------------------------------------------------------- MoSLoRA through the step


def test_moslora_neo_trains_and_merges_through_evaluate(tiny_workspace, tmp_path):
    from llmneo.evaluate import merge
    from llmneo.lora import MOSLORA_CONFIG, base_model

    workdir = make_workdir(tmp_path / "d", tiny_workspace, "distill.lora_variant=moslora")
    trainer = run(workdir)
    assert (workdir / "adapter" / MOSLORA_CONFIG).is_file()
    assert any(".lora_mixer." in k for k in adapter(workdir))
    merged, _ = merge(tiny_workspace / "student", workdir, tmp_path / "merged")
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    student = base_model(trainer.student).eval()
    with torch.no_grad():
        assert torch.allclose(merged.eval()(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
