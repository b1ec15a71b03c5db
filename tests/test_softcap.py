"""Final logit soft-capping (Gemma-2/3: logits = tanh(z / c) · c): every path that makes logits from
hidden states — the chunked loss (student and teacher heads), the teacher's top-k cache, the fidelity
evaluation — gives the model's own logits, i.e. the same numbers as the naive path through
``model(...).logits``; a model without soft-capping keeps its plain head."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import prompt_and_padding_batch
from llmneo.evaluate import fidelity
from llmneo.heads import final_logit_softcap, logits_head
from llmneo.losses import (
    LossSpec,
    TeacherHead,
    TeacherTopK,
    chunked_distill_loss,
    distill_loss,
    shift_mask,
)
from llmneo.signals import OnlineTeacher
from llmneo.topk import teacher_topk
from llmneo.trainer import DistillModule

V, CAP = 48, 2.0


def tiny_gemma2(seed: int, cap: float | None = CAP) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8,
                          max_position_embeddings=64, final_logit_softcapping=cap, attn_logit_softcapping=50.0,
                          tie_word_embeddings=False, attn_implementation="eager", pad_token_id=0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # logits of several units, well beyond the cap: capping changes them a lot
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def batch():
    return prompt_and_padding_batch(V, low=1)


def loss_and_grads(student, teacher, batch, spec):
    module = DistillModule(student, spec)
    module.set_signal(OnlineTeacher(teacher))
    student.zero_grad(set_to_none=True)
    loss, ce, kd = module(**batch)
    (loss / int(shift_mask(batch["labels"])[0].sum())).backward()  # the mean, as the trainer steps on it
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return float(loss.detach()), float(ce), float(kd), grads


@pytest.mark.parametrize("divergence,T", [("forward_kl", 1.0), ("forward_kl", 2.0), ("reverse_kl", 1.0)])
def test_chunked_loss_equals_naive_on_a_soft_capped_model(batch, divergence, T):
    """Student and teacher are soft-capped Gemma-2 models; every student weight is trainable (the LM
    head gets its gradient through the cap). Closed-form (forward KL) and autograd (reverse KL) paths."""
    student, teacher = tiny_gemma2(1).train(), tiny_gemma2(2)
    naive = loss_and_grads(student, teacher, batch, LossSpec(alpha=0.6, temperature=T, divergence=divergence,
                                                             loss_impl="naive"))
    chunked = loss_and_grads(student, teacher, batch, LossSpec(alpha=0.6, temperature=T, divergence=divergence,
                                                               loss_chunk_tokens=3))
    for a, b in zip(chunked[:3], naive[:3], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert chunked[3].keys() == naive[3].keys() and "lm_head.weight" in chunked[3]
    for name, g in naive[3].items():
        assert torch.allclose(chunked[3][name], g, atol=1e-6), name


def test_the_plain_head_would_be_wrong(batch):
    """Guard for the test above: on this model, ignoring the cap changes the loss a lot."""
    student, teacher = tiny_gemma2(1), tiny_gemma2(2)
    mask, targets = shift_mask(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_hidden = student.model(**inputs).last_hidden_state[:, :-1][mask]
        t_hidden = teacher.model(**inputs).last_hidden_state[:, :-1][mask]
        spec = LossSpec(alpha=1.0)
        capped = chunked_distill_loss(s_hidden, targets, logits_head(student),
                                      TeacherHead(t_hidden, logits_head(teacher)), spec)
        plain = chunked_distill_loss(s_hidden, targets, student.lm_head, TeacherHead(t_hidden, teacher.lm_head), spec)
        naive = distill_loss(student(**inputs).logits, batch["labels"], teacher(**inputs).logits, spec)
    assert float(capped.kd) == pytest.approx(float(naive.kd), rel=1e-5)
    assert float(plain.kd) > 2 * float(naive.kd)


@pytest.mark.parametrize("tail", ["tail", "renormalize"])
def test_topk_cache_with_k_equal_vocab_equals_online_kd(batch, tail):
    """The teacher step's top-k computation (k = V) on a soft-capped teacher: its log-probs are the
    log-softmax of the teacher's own (capped) logits, and KD from them equals the online KD."""
    student, teacher = tiny_gemma2(1), tiny_gemma2(2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ids, logprobs, counts = teacher_topk(teacher, batch, k=V, vocab_size=V, chunk_tokens=4)
    mask, targets = shift_mask(batch["labels"])
    assert counts == mask.sum(1).tolist()
    with torch.no_grad():
        t_logits = teacher(**inputs).logits
        s_logits = student(**inputs).logits
    want = torch.log_softmax(t_logits[:, :-1][mask].float(), -1)
    assert torch.allclose(want.gather(-1, ids), logprobs, atol=1e-5)
    spec = LossSpec(alpha=1.0, topk_tail=tail)
    online = distill_loss(s_logits, batch["labels"], t_logits, spec)
    with torch.no_grad():
        s_hidden = student.model(**inputs).last_hidden_state[:, :-1][mask]
        offline = chunked_distill_loss(s_hidden, targets, logits_head(student), TeacherTopK(ids, logprobs),
                                       LossSpec(alpha=1.0, topk_tail=tail, loss_chunk_tokens=5))
    assert float(offline.kd) == pytest.approx(float(online.kd), rel=1e-5)


def test_fidelity_uses_the_capped_logits(batch):
    student, teacher = tiny_gemma2(1), tiny_gemma2(2)
    rows = [{"input_ids": batch["input_ids"][i].tolist(), "labels": batch["labels"][i].tolist()} for i in range(1)]
    got = fidelity({"s": student}, teacher, rows, pad_id=0, chunk_tokens=2)["s"]
    mask, _ = shift_mask(batch["labels"][:1])
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"][:1]).logits[:, :-1][mask]
        t = teacher(input_ids=batch["input_ids"][:1]).logits[:, :-1][mask]
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                    reduction="batchmean")
    assert got["kl_to_teacher"] == pytest.approx(float(kl), rel=1e-5)


def test_models_without_soft_capping_keep_their_plain_head():
    gemma = tiny_gemma2(3, cap=None)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    for model in (gemma, llama):
        assert final_logit_softcap(model) is None
        assert logits_head(model) is model.get_output_embeddings()
    assert final_logit_softcap(tiny_gemma2(3)) == CAP
