"""distill.compile: the regionally compiled student (torch.compile per decoder layer) gives the loss and
gradients of the eager one, on the CPU (inductor's C++ backend); off by default on the CPU."""

import pytest
import torch

from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.launch import TrainerInputs, write_workdir
from llmneo.trainer import DistillTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def trainer_for(ws, path, *overrides) -> DistillTrainer:
    cfg = load_config("tiny", ["distill.max_steps=1", *overrides])
    workdir = write_workdir(path, cfg, TrainerInputs.of(ws / "dataset", ws / "teacher", ws / "student"))
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    return trainer


def loss_and_grads(trainer: DistillTrainer):
    """(ce, kd) sums and the trainable gradients of the first micro-batch of step 0."""
    rows = trainer.global_batch(0)[:trainer.d.micro_batch_size]
    ce, kd = trainer.micro_step(trainer.micro_batch(rows), n_tokens=1, last=True)
    return (float(ce), float(kd)), {n: p.grad.clone() for n, p in trainer.student.named_parameters()
                                    if p.grad is not None}


def test_auto_is_eager_on_cpu(tiny_workspace, tmp_path):
    trainer = trainer_for(tiny_workspace, tmp_path)
    assert trainer.d.compile == "auto" and not trainer.compiles()
    layers = trainer.student.base_model.model.model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_compile_must_be_auto_true_or_false():
    with pytest.raises(UserError, match=r"^distill.compile: must be one of 'auto', True, False, got 'maybe'$"):
        load_config("tiny", ["distill.compile=maybe"])


@pytest.mark.integration  # compiling two layers with inductor takes a while on a small CPU
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_workspace, tmp_path):
    torch._dynamo.reset()
    eager = trainer_for(tiny_workspace, tmp_path / "eager", "distill.compile=false")
    compiled = trainer_for(tiny_workspace, tmp_path / "compiled", "distill.compile=true")
    layers = compiled.student.base_model.model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    (ce_e, kd_e), grads_e = loss_and_grads(eager)
    (ce_c, kd_c), grads_c = loss_and_grads(compiled)
    # fp32 on both sides; inductor fuses and reorders reductions: equal to float round-off
    assert ce_c == pytest.approx(ce_e, rel=1e-5) and kd_c == pytest.approx(kd_e, rel=1e-5)
    assert grads_e and set(grads_c) == set(grads_e)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.integration
@pytest.mark.parametrize("teacher_kind, temperature, tail", [
    ("none", 1.0, "tail"), ("logits", 1.0, "tail"), ("logits", 2.0, "tail"), ("topk", 1.0, "tail"),
    ("topk", 2.0, "renormalize")])
def test_compiled_chunk_losses_equal_the_eager_ones(teacher_kind, temperature, tail):
    """The closed-form chunk losses (CE, forward KL on logits or on the top-k cache) through
    torch.compile: loss, CE, KD and the logits' gradient equal the eager function's, for a full chunk
    and a shorter last one (dynamic length), to fp32 rounding (rtol 1e-5, atol 1e-6)."""
    import dataclasses

    from llmneo.losses import LossSpec, TeacherTopK, _chunk_loss_and_grad

    g = torch.Generator().manual_seed(0)
    n, vocab, k = 37, 100, 8
    z, t = torch.randn(n, vocab, generator=g) * 3, torch.randn(n, vocab, generator=g) * 3
    y = torch.randint(0, vocab, (n,), generator=g)
    if teacher_kind == "topk":
        top = torch.log_softmax(t, -1).topk(k, -1)
        teacher = TeacherTopK(top.indices, top.values, in_vocab=True)
    spec = LossSpec(alpha=0.7, temperature=temperature, topk_tail=tail)
    for rows in (slice(0, n), slice(0, 20)):
        def run(s, rows=rows):
            target = None if teacher_kind == "none" else t[rows].clone() if teacher_kind == "logits" else teacher[rows]
            return _chunk_loss_and_grad(z[rows].clone(), y[rows], target, s)

        want, got = run(spec), run(dataclasses.replace(spec, compiled=True))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
