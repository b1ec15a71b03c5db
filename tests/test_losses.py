"""NEO loss numerics on small random tensors (TRL-style: 2×3×5 and friends)."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmneo.losses import IGNORE_INDEX, chunked_distill_loss, distill_loss, divergence, shift_mask


def reference(student, teacher, labels, alpha, T=1.0):
    """Textbook formula, loops and all: next-token CE + T²·KL(teacher‖student) over labelled positions."""
    ce, kd, n = 0.0, 0.0, 0
    B, L, V = student.shape
    for b in range(B):
        for t in range(L - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            ps = torch.softmax(student[b, t].double() / T, -1)
            pt = torch.softmax(teacher[b, t].double() / T, -1)
            ce += -math.log(torch.softmax(student[b, t].double(), -1)[y])
            kd += float((pt * (pt.log() - ps.log())).sum())
            n += 1
    return ((1 - alpha) * ce + alpha * T * T * kd) / n, ce / n, kd / n


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 11, generator=g)
    teacher = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, 5] = IGNORE_INDEX  # padding
    return student, teacher, labels


def test_identical_logits_give_zero_kd(batch):
    student, _, labels = batch
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        sums = distill_loss(student, labels, student.clone(), alpha=1.0, kind=kind)
        assert abs(float(sums.kd)) < 1e-6


@pytest.mark.parametrize("alpha, T", [(0.0, 1.0), (0.5, 1.0), (0.9, 2.0), (1.0, 1.0)])
def test_matches_reference_formula(batch, alpha, T):
    student, teacher, labels = batch
    sums = distill_loss(student, labels, teacher, alpha=alpha, temperature=T)
    ref_loss, ref_ce, ref_kd = reference(student, teacher, labels, alpha, T)
    assert float(sums.loss) / sums.tokens == pytest.approx(ref_loss, rel=1e-5)
    assert float(sums.ce) / sums.tokens == pytest.approx(ref_ce, rel=1e-5)
    assert float(sums.kd) / sums.tokens == pytest.approx(ref_kd, rel=1e-5)


def test_forward_kl_equals_torch_kl_div(batch):
    student, teacher, _ = batch
    s, t = student.reshape(-1, 11), teacher.reshape(-1, 11)
    ours = divergence(s, t).sum()
    theirs = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="sum", log_target=True)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_masked_tokens_ignored(batch):
    student, teacher, labels = batch
    base = distill_loss(student, labels, teacher, alpha=0.5)
    mask, _ = shift_mask(labels)
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[:, :-1][~mask] = 1e4 * torch.randn_like(garbage_s[:, :-1][~mask])
    garbage_t[:, :-1][~mask] = -1e4
    again = distill_loss(garbage_s, labels, garbage_t, alpha=0.5)
    assert float(again.loss) == pytest.approx(float(base.loss), rel=1e-6)
    assert again.tokens == base.tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_all_masked_is_zero_not_nan():
    labels = torch.full((1, 4), IGNORE_INDEX)
    sums = distill_loss(torch.randn(1, 4, 5), labels, torch.randn(1, 4, 5), alpha=0.5)
    assert sums.tokens == 0 and float(sums.loss) == 0.0


def test_shift_alignment_catches_off_by_one(batch):
    """KD must use the same (shifted) positions as CE; masking KD with unshifted labels differs."""
    student, teacher, labels = batch
    sums = distill_loss(student, labels, teacher, alpha=1.0)
    # the seed's mistake: KD over positions where the *unshifted* label is valid
    wrong_mask = labels != IGNORE_INDEX
    wrong = divergence(student[wrong_mask], teacher[wrong_mask]).sum()
    assert float(sums.kd) != pytest.approx(float(wrong), rel=1e-3)
    mask, _ = shift_mask(labels)
    right = divergence(student[:, :-1][mask], teacher[:, :-1][mask]).sum()
    assert float(sums.kd) == pytest.approx(float(right), rel=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_equals_unchunked_values_and_grads(kind, chunk):
    g = torch.Generator().manual_seed(1)
    B, L, H, V, Vt = 2, 7, 8, 13, 16  # teacher vocab padded larger (sliced)
    hidden = torch.randn(B, L, H, generator=g, requires_grad=True)
    t_hidden = torch.randn(B, L, H, generator=g)
    head, t_head = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, Vt, bias=False)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :2] = IGNORE_INDEX
    full = distill_loss(head(hidden), labels, t_head(t_hidden), alpha=0.7, temperature=2.0, kind=kind, beta=0.3)
    (g_full,) = torch.autograd.grad(full.loss, hidden)
    mask, targets = shift_mask(labels)
    chunked = chunked_distill_loss(hidden[:, :-1][mask], targets, head, t_hidden[:, :-1][mask], t_head,
                                   alpha=0.7, temperature=2.0, kind=kind, beta=0.3, chunk_tokens=chunk)
    (g_chunk,) = torch.autograd.grad(chunked.loss, hidden)
    assert float(chunked.loss) == pytest.approx(float(full.loss), rel=1e-5)
    assert float(chunked.kd) == pytest.approx(float(full.kd), rel=1e-5)
    assert torch.allclose(g_chunk, g_full, atol=1e-6)


def test_jsd_endpoints():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    assert torch.allclose(divergence(s, t, "jsd", beta=0.0), divergence(s, t, "forward_kl"))
    assert torch.allclose(divergence(s, t, "jsd", beta=1.0), divergence(s, t, "reverse_kl"))
    mid = divergence(s, t, "jsd", beta=0.5)
    assert (mid >= 0).all() and (mid <= math.log(2) + 1e-6).all()  # JSD is bounded by log 2
