"""NEO loss numerics on small random tensors (TRL-style: 2×3×5 and friends)."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmneo.losses import (
    IGNORE_INDEX,
    LossSpec,
    TeacherHead,
    TeacherTopK,
    chunked_distill_loss,
    distill_loss,
    divergence,
    shift_mask,
    token_loss,
    topk_divergence,
)


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
        sums = distill_loss(student, labels, student.clone(), LossSpec(alpha=1.0, divergence=kind))
        assert abs(float(sums.kd)) < 1e-6


@pytest.mark.parametrize("alpha, T", [(0.0, 1.0), (0.5, 1.0), (0.9, 2.0), (1.0, 1.0)])
def test_matches_reference_formula(batch, alpha, T):
    student, teacher, labels = batch
    sums = distill_loss(student, labels, teacher, LossSpec(alpha=alpha, temperature=T))
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
    base = distill_loss(student, labels, teacher, LossSpec(alpha=0.5))
    mask, _ = shift_mask(labels)
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[:, :-1][~mask] = 1e4 * torch.randn_like(garbage_s[:, :-1][~mask])
    garbage_t[:, :-1][~mask] = -1e4
    again = distill_loss(garbage_s, labels, garbage_t, LossSpec(alpha=0.5))
    assert float(again.loss) == pytest.approx(float(base.loss), rel=1e-6)
    assert again.tokens == base.tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_all_masked_is_zero_not_nan():
    labels = torch.full((1, 4), IGNORE_INDEX)
    sums = distill_loss(torch.randn(1, 4, 5), labels, torch.randn(1, 4, 5), LossSpec(alpha=0.5))
    assert sums.tokens == 0 and float(sums.loss) == 0.0


def test_shift_alignment_catches_off_by_one(batch):
    """KD must use the same (shifted) positions as CE; masking KD with unshifted labels differs."""
    student, teacher, labels = batch
    sums = distill_loss(student, labels, teacher, LossSpec(alpha=1.0))
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
    spec = LossSpec(alpha=0.7, temperature=2.0, divergence=kind, jsd_beta=0.3, loss_chunk_tokens=chunk)
    full = distill_loss(head(hidden), labels, t_head(t_hidden), spec)
    (g_full,) = torch.autograd.grad(full.loss, hidden)
    mask, targets = shift_mask(labels)
    chunked = chunked_distill_loss(hidden[:, :-1][mask], targets, head, TeacherHead(t_hidden[:, :-1][mask], t_head),
                                   spec)
    (g_chunk,) = torch.autograd.grad(chunked.loss, hidden)
    assert float(chunked.loss.detach()) == pytest.approx(float(full.loss.detach()), rel=1e-5)
    assert float(chunked.kd) == pytest.approx(float(full.kd), rel=1e-5)
    assert torch.allclose(g_chunk, g_full, atol=1e-6)


def test_jsd_endpoints():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    assert torch.allclose(divergence(s, t, LossSpec(divergence="jsd", jsd_beta=0.0)),
                          divergence(s, t, LossSpec(divergence="forward_kl")))
    assert torch.allclose(divergence(s, t, LossSpec(divergence="jsd", jsd_beta=1.0)),
                          divergence(s, t, LossSpec(divergence="reverse_kl")))
    mid = divergence(s, t, LossSpec(divergence="jsd", jsd_beta=0.5))
    assert (mid >= 0).all() and (mid <= math.log(2) + 1e-6).all()  # JSD is bounded by log 2


@pytest.mark.parametrize("beta", [1e-3, 1 - 1e-3])
def test_jsd_near_an_endpoint_is_about_beta_times_smaller_not_the_kl(beta):
    """What docs/configuration.md says: exactly 0/1 switch to forward/reverse KL (TRL), while β = 0.001
    (or 0.999) gives a KD term ~1000× smaller than that KL."""
    g = torch.Generator().manual_seed(0)
    s, t = 2 * torch.randn(64, 100, generator=g), 2 * torch.randn(64, 100, generator=g)
    near = float(divergence(s, t, LossSpec(divergence="jsd", jsd_beta=beta)).mean())
    end = float(divergence(s, t, LossSpec(divergence="jsd", jsd_beta=round(beta))).mean())
    assert 0.5e-3 < near / end < 2e-3


# ---------------------------------------------------------------------------- trainable head (sft/kd)


def test_chunked_trainable_head_gets_the_same_gradient():
    """sft/kd train the LM head too: its gradient from the chunked loss equals the unchunked one."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 9, 6, 17
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    head = torch.nn.Linear(H, V, bias=True)
    t_head = torch.nn.Linear(H, V, bias=False)
    t_hidden = torch.randn(N, H, generator=g)
    spec = LossSpec(alpha=0.4, temperature=1.5, loss_chunk_tokens=4)
    full = token_loss(head(hidden), targets, t_head(t_hidden), spec)[0]
    ref = torch.autograd.grad(full, [hidden, head.weight, head.bias])
    chunked = chunked_distill_loss(hidden, targets, head, TeacherHead(t_hidden, t_head), spec)
    got = torch.autograd.grad(chunked.loss, [hidden, head.weight, head.bias])
    assert float(chunked.loss.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_chunked_without_grad_matches():
    g = torch.Generator().manual_seed(4)
    hidden, head = torch.randn(7, 5, generator=g), torch.nn.Linear(5, 11, bias=False)
    targets = torch.randint(0, 11, (7,), generator=g)
    with torch.no_grad():
        a = chunked_distill_loss(hidden, targets, head, None, LossSpec(alpha=0.0, loss_chunk_tokens=2))
        b = token_loss(head(hidden), targets, None, LossSpec(alpha=0.0))
    assert float(a.loss) == pytest.approx(float(b[0]), rel=1e-6) and float(a.kd) == 0.0


# ---------------------------------------------------------------------------- offline teacher (top-k)


def _topk(logits: torch.Tensor, k: int) -> TeacherTopK:
    lp = torch.log_softmax(logits.double(), -1)
    values, ids = lp.topk(k, dim=-1)
    return TeacherTopK(ids, values.float())


def test_topk_renormalize_matches_formula():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 13, generator=g), torch.randn(6, 13, generator=g)
    top = _topk(t, 4)
    T = 1.7
    got = topk_divergence(s, top, LossSpec(divergence="forward_kl", temperature=T, topk_tail="renormalize"))
    pt = torch.softmax(t.gather(-1, top.ids).double() / T, -1)  # teacher restricted to its top-k
    ps = torch.softmax(s.gather(-1, top.ids).double() / T, -1)  # student restricted to the same ids
    want = (pt * (pt.log() - ps.log())).sum(-1)
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_topk_tail_bucket_matches_formula_and_lower_bounds_full_kl():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(6, 13, generator=g), 2 * torch.randn(6, 13, generator=g)
    top = _topk(t, 4)
    got = topk_divergence(s, top, LossSpec(divergence="forward_kl", topk_tail="tail"))
    pt_full, ps_full = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    pt = torch.cat([pt_full.gather(-1, top.ids), 1 - pt_full.gather(-1, top.ids).sum(-1, keepdim=True)], -1)
    ps = torch.cat([ps_full.gather(-1, top.ids), 1 - ps_full.gather(-1, top.ids).sum(-1, keepdim=True)], -1)
    want = (pt * (pt.log() - ps.log())).sum(-1)  # exact KL of the (k+1)-category coarsening
    assert torch.allclose(got.double(), want, atol=1e-6)
    full = divergence(s, t)
    assert (got <= full + 1e-6).all() and (got > 0).all()  # data processing: coarse KL <= full KL


@pytest.mark.parametrize("tail", ["tail", "renormalize"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_the_whole_vocabulary_equals_full_divergence(kind, tail):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(5, 9, generator=g, requires_grad=True)
    t = torch.randn(5, 9, generator=g)
    spec = LossSpec(divergence=kind, temperature=1.3, jsd_beta=0.3, topk_tail=tail)
    got = topk_divergence(s, _topk(t, 9), spec)
    want = divergence(s, t, spec)
    assert torch.allclose(got, want, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), s)
    (grad_want,) = torch.autograd.grad(want.sum(), s)
    assert torch.isfinite(grad_got).all() and torch.allclose(grad_got, grad_want, atol=1e-6)


def test_topk_ids_beyond_student_vocab_are_dropped():
    """A teacher with a padded vocabulary may rank padding ids in its top-k: they are ignored."""
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    top = _topk(t, 3)
    padded = TeacherTopK(torch.cat([top.ids, torch.full((4, 1), 12)], -1),
                         torch.cat([top.logprobs, torch.full((4, 1), -30.0)], -1))
    for tail in ("tail", "renormalize"):
        spec = LossSpec(topk_tail=tail)
        assert torch.allclose(topk_divergence(s, padded, spec), topk_divergence(s, top, spec), atol=1e-6)


@pytest.mark.parametrize("tail", ["tail", "renormalize"])
@pytest.mark.parametrize("kind, T, k", [("forward_kl", 1.0, 4), ("forward_kl", 2.0, 4), ("forward_kl", 1.0, 11),
                                        ("reverse_kl", 1.5, 4), ("forward_kl", 1.0, "padded")])
def test_chunked_topk_equals_reference(tail, kind, T, k):
    """The chunked top-k loss (closed-form gradient for forward KL, autograd otherwise, and for ids
    beyond the vocabulary) equals the reference `distill_loss` on full logits, values and gradients."""
    g = torch.Generator().manual_seed(9)
    B, L, H, V = 2, 6, 5, 11
    hidden = torch.randn(B, L, H, generator=g, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[1, :3] = IGNORE_INDEX
    mask, targets = shift_mask(labels)
    top = _topk(2 * torch.randn(int(mask.sum()), V, generator=g), V if k == 11 else 4)
    if k == "padded":  # a padded teacher vocabulary ranked id 12 in its top-k
        top = TeacherTopK(torch.cat([top.ids, torch.full_like(top.ids[:, :1], 12)], -1),
                          torch.cat([top.logprobs, torch.full_like(top.logprobs[:, :1], -9.0)], -1))
    spec = LossSpec(alpha=0.6, temperature=T, divergence=kind, topk_tail=tail, loss_chunk_tokens=3)
    full = distill_loss(head(hidden), labels, top, spec)
    ref = torch.autograd.grad(full.loss, [hidden, head.weight])
    chunked = chunked_distill_loss(hidden[:, :-1][mask], targets, head, top, spec)
    got = torch.autograd.grad(chunked.loss, [hidden, head.weight])
    assert float(chunked.loss.detach()) == pytest.approx(float(full.loss.detach()), rel=1e-5)
    assert float(chunked.kd) == pytest.approx(float(full.kd), rel=1e-5, abs=1e-6) and float(full.kd) >= 0
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6)


def test_cached_topk_with_k_equal_vocab_gives_the_online_kd(tiny_workspace, tmp_path):
    """The teacher's log-softmax over the prepared rows, written with TopKWriter (k = V, fp16) and
    read back with TopKCache, gives the same KD loss as the online teacher logits."""
    from llmneo.data import collate, read_split
    from llmneo.models import load_causal_lm
    from llmneo.topk import TopKCache, TopKWriter

    teacher = load_causal_lm(tiny_workspace / "teacher").eval()
    student = load_causal_lm(tiny_workspace / "student").eval()
    rows = read_split(tiny_workspace / "dataset", "train")[:6]
    vocab = teacher.config.vocab_size
    batch = collate(rows, pad_id=0)
    mask, _ = shift_mask(batch["labels"])
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    writer = TopKWriter(tmp_path / "topk", k=vocab, vocab_size=vocab, dtype="float16")
    for i in range(len(rows)):
        lp = torch.log_softmax(t_logits[i, :-1][mask[i]].float(), -1)
        values, ids = lp.topk(vocab, dim=-1)
        writer.add(ids, values)
    writer.close()
    cache = TopKCache(tmp_path / "topk")
    ids, lps = zip(*(cache[i] for i in range(len(rows))), strict=True)
    cached = TeacherTopK(torch.cat(ids), torch.cat(lps))
    online = distill_loss(s_logits, batch["labels"], t_logits, LossSpec(alpha=1.0))
    for tail in ("tail", "renormalize"):
        offline = distill_loss(s_logits, batch["labels"], cached, LossSpec(alpha=1.0, topk_tail=tail))
        assert offline.tokens == online.tokens
        assert float(offline.kd) == pytest.approx(float(online.kd), rel=2e-3)  # fp16 log-prob storage


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_chunked_ce_only_equals_reference(alpha):
    """sft/lora (no teacher): the closed-form CE gradient equals autograd's."""
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    head = torch.nn.Linear(4, 9, bias=False)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[0, 1] = IGNORE_INDEX
    spec = LossSpec(alpha=alpha, loss_chunk_tokens=2)
    full = distill_loss(head(hidden), labels, None, spec)
    ref = torch.autograd.grad(full.loss, [hidden, head.weight])
    mask, targets = shift_mask(labels)
    chunked = chunked_distill_loss(hidden[:, :-1][mask], targets, head, None, spec)
    got = torch.autograd.grad(chunked.loss, [hidden, head.weight])
    assert float(chunked.loss.detach()) == pytest.approx(float(full.loss.detach()), rel=1e-6)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
