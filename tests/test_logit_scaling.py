"""Models that rescale their logits inside their own forward (Granite: ``/ config.logits_scaling``,
Cohere: ``· config.logit_scale``): every path that makes logits from hidden states — the chunked loss,
the teacher's top-k cache, the fidelity evaluation — gives the model's own logits, i.e. the numbers of
``model(...).logits``. At set-up, :func:`llmneo.heads.check_logits_head` compares the two on a few
tokens and refuses an architecture whose forward does something else (one line), and
:func:`llmneo.heads.check_packing` refuses packing for a model whose attention crosses packed documents
(OPT builds its mask from the attention mask only, not from restarting ``position_ids``)."""

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from conftest import prompt_and_padding_batch
from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.evaluate import fidelity
from llmneo.heads import HeadMismatch, check_logits_head, check_packing, logit_scale, logits_head
from llmneo.launch import TrainerInputs
from llmneo.losses import LossSpec, shift_mask
from llmneo.signals import OnlineTeacher
from llmneo.topk import build_topk_cache, teacher_topk
from llmneo.trainer import DistillModule, DistillTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V = 48
SHAPE = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _loud(model):
    with torch.no_grad():  # logits of several units: a wrong scale changes the loss a lot
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


def tiny_granite(seed: int, scaling: float = 8.0, vocab: int = V) -> GraniteForCausalLM:
    """A random-init Granite that divides its head's output by ``scaling`` (8–16 in Granite 3 releases)."""
    torch.manual_seed(seed)
    return _loud(GraniteForCausalLM(GraniteConfig(**{**SHAPE, "vocab_size": vocab}, logits_scaling=scaling,
                                                  tie_word_embeddings=False)))


def tiny_cohere(seed: int, scale: float = 0.25) -> CohereForCausalLM:
    """A random-init Cohere that multiplies its (tied) head's output by ``scale``."""
    torch.manual_seed(seed)
    return _loud(CohereForCausalLM(CohereConfig(**SHAPE, logit_scale=scale)))


def tiny_llama(seed: int, cls=LlamaForCausalLM, vocab: int = V):
    torch.manual_seed(seed)
    return _loud(cls(LlamaConfig(**{**SHAPE, "vocab_size": vocab}, tie_word_embeddings=False)))


def tiny_opt(seed: int, vocab: int = V) -> OPTForCausalLM:
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


class RescalingLlama(LlamaForCausalLM):
    """An architecture llmneo does not know: its forward multiplies the head's output by 3."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def loss_and_grads(student, teacher, batch, spec):
    module = DistillModule(student, spec)
    module.set_signal(OnlineTeacher(teacher))
    student.zero_grad(set_to_none=True)
    loss, ce, kd = module(**batch)
    (loss / int(shift_mask(batch["labels"])[0].sum())).backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return float(loss.detach()), float(ce), float(kd), grads


MODELS = {"granite": tiny_granite, "cohere": tiny_cohere}


@pytest.fixture(scope="module")
def batch():
    return prompt_and_padding_batch(V, low=3)


# ---------------------------------------------------------------------------- the head path = the forward


def test_logit_scale_of_each_architecture():
    assert logit_scale(tiny_granite(0, scaling=16.0)) == pytest.approx(1 / 16)
    assert logit_scale(tiny_cohere(0, scale=0.0625)) == pytest.approx(0.0625)
    llama = tiny_llama(0)
    assert logit_scale(llama) is None and logits_head(llama) is llama.get_output_embeddings()


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_chunked_loss_equals_naive_on_a_rescaling_model(batch, arch, divergence):
    """Student and teacher rescale their logits; the chunked loss (hidden states → head per chunk) gives
    the loss and gradients of the naive path through ``model(...).logits``."""
    make = MODELS[arch]
    student, teacher = make(1).train(), make(2)
    spec = dict(alpha=0.6, temperature=1.0, divergence=divergence)
    naive = loss_and_grads(student, teacher, batch, LossSpec(**spec, loss_impl="naive"))
    chunked = loss_and_grads(student, teacher, batch, LossSpec(**spec, loss_chunk_tokens=3))
    for a, b in zip(chunked[:3], naive[:3], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert chunked[2] > 1e-3  # a KD term that a wrong scale would change a lot
    for name, g in naive[3].items():
        assert torch.allclose(chunked[3][name], g, atol=1e-6), name


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_topk_cache_of_a_rescaling_teacher_is_its_own_log_softmax(batch, arch):
    teacher = MODELS[arch](2)
    ids, logprobs, counts = teacher_topk(teacher, batch, k=V, vocab_size=V, chunk_tokens=4)
    mask, _ = shift_mask(batch["labels"])
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.log_softmax(t_logits[:, :-1][mask].float(), -1)
    assert torch.allclose(want.gather(-1, ids), logprobs, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_fidelity_of_rescaling_models_uses_their_own_logits(batch, arch):
    student, teacher = MODELS[arch](1), MODELS[arch](2)
    rows = [{"input_ids": batch["input_ids"][i].tolist(), "labels": batch["labels"][i].tolist()} for i in range(1)]
    got = fidelity({"s": student}, teacher, rows, pad_id=0, chunk_tokens=2)
    mask, targets = shift_mask(batch["labels"][:1])
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"][:1]).logits[:, :-1][mask]
        t = teacher(input_ids=batch["input_ids"][:1]).logits[:, :-1][mask]
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                    reduction="batchmean")
    assert got["s"]["kl_to_teacher"] == pytest.approx(float(kl), rel=1e-5)
    ppl = torch.exp(torch.nn.functional.cross_entropy(t, targets))
    assert got["teacher"]["perplexity"] == pytest.approx(float(ppl), rel=1e-5)
    assert float(s.abs().max()) > 1.0  # logits large enough for a wrong scale to matter


# ---------------------------------------------------------------------------- the set-up checks


@pytest.mark.parametrize("make", [tiny_llama, tiny_granite, tiny_cohere])
def test_check_accepts_the_architectures_it_reproduces(make):
    model = make(0).train()
    state = torch.random.get_rng_state()
    check_logits_head(model, "student")
    assert model.training  # the check's eval mode is undone
    assert torch.equal(torch.random.get_rng_state(), state)  # and it draws nothing from the global RNG


def test_check_refuses_an_unknown_rescaling_in_one_line():
    with pytest.raises(HeadMismatch) as e:
        check_logits_head(tiny_llama(0, RescalingLlama), "teacher")
    message = str(e.value)
    assert "\n" not in message and message.startswith("teacher (llama): logits from its LM head differ")
    assert isinstance(e.value, UserError)


def test_check_refuses_a_head_that_does_not_match():
    """The old head path on a Granite model (no scaling), passed in as the head to check."""
    granite = tiny_granite(0)
    with pytest.raises(HeadMismatch, match=r"^model 'distilled' \(granite\): logits from its LM head differ"):
        check_logits_head(granite, "model 'distilled'", head=granite.lm_head)


def test_packing_check_passes_llama_and_refuses_opt():
    check_packing(tiny_llama(0), "student")
    with pytest.raises(HeadMismatch) as e:
        check_packing(tiny_opt(0), "student")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("student (opt): data.packing is not supported for this model type")


# ---------------------------------------------------------------------------- the checks at each set-up


def _vocab(ws) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ws / "student").vocab_size


class _Trainer(DistillTrainer):
    student_model = teacher_model = None

    def load_student(self):
        return self.student_model if self.student_model is not None else super().load_student()

    def load_teacher(self):
        return self.teacher_model if self.teacher_model is not None else super().load_teacher()


def _trainer(tmp_path, dataset, ws, *overrides, student=None, teacher=None) -> _Trainer:
    cfg = load_config("tiny", ["distill.max_steps=1", "distill.save_every=0", *overrides])
    trainer = _Trainer(cfg, TrainerInputs.of(dataset, ws / "teacher", ws / "student"), tmp_path / "w")
    trainer.student_model, trainer.teacher_model = student, teacher
    return trainer


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_trainer_setup_refuses_an_unknown_rescaling(tiny_workspace, tmp_path, role):
    vocab = _vocab(tiny_workspace)
    model = tiny_llama(0, RescalingLlama, vocab=vocab)
    trainer = _trainer(tmp_path, tiny_workspace / "dataset", tiny_workspace, **{role: model})
    with pytest.raises(HeadMismatch, match=rf"^{role} \(llama\): logits from its LM head differ"):
        trainer.setup()


def test_trainer_setup_accepts_granite_and_naive_loss_skips_the_head_check(tiny_workspace, tmp_path):
    vocab = _vocab(tiny_workspace)
    trainer = _trainer(tmp_path, tiny_workspace / "dataset", tiny_workspace,
                       student=tiny_granite(0, vocab=vocab), teacher=tiny_granite(1, vocab=vocab))
    trainer.setup()
    trainer.cleanup()
    # the naive loss runs through model(...).logits: any architecture is right there
    trainer = _trainer(tmp_path / "naive", tiny_workspace / "dataset", tiny_workspace, "distill.loss_impl=naive",
                       student=tiny_llama(0, RescalingLlama, vocab=vocab))
    trainer.setup()
    trainer.cleanup()


@pytest.fixture(scope="module")
def packed_dataset(tmp_path_factory):
    from llmneo.steps import prepare_dataset

    out = tmp_path_factory.mktemp("packed") / "dataset"
    prepare_dataset(load_config("tiny", ["data.packing=true"]), out)
    return out


def test_trainer_and_teacher_step_refuse_packing_for_opt(tiny_workspace, packed_dataset, tmp_path):
    vocab = _vocab(tiny_workspace)
    trainer = _trainer(tmp_path, packed_dataset, tiny_workspace, student=tiny_opt(0, vocab=vocab))
    with pytest.raises(HeadMismatch, match=r"^student \(opt\): data.packing is not supported"):
        trainer.setup()
    trainer = _trainer(tmp_path / "t", packed_dataset, tiny_workspace, teacher=tiny_opt(0, vocab=vocab))
    with pytest.raises(HeadMismatch, match=r"^teacher \(opt\): data.packing is not supported"):
        trainer.setup()
    cfg = load_config("tiny", ["teacher.mode=offline"])
    with pytest.raises(HeadMismatch, match=r"^teacher \(opt\): data.packing is not supported"):
        build_topk_cache(cfg, tiny_opt(0, vocab=vocab), packed_dataset, tmp_path / "topk", vocab)
    # the same data and a Llama: accepted
    _trainer(tmp_path / "llama", packed_dataset, tiny_workspace).setup()


def test_teacher_step_and_fidelity_refuse_an_unknown_rescaling(tiny_workspace, batch, tmp_path):
    vocab = _vocab(tiny_workspace)
    cfg = load_config("tiny", ["teacher.mode=offline"])
    with pytest.raises(HeadMismatch, match=r"^teacher \(llama\): logits from its LM head differ"):
        build_topk_cache(cfg, tiny_llama(0, RescalingLlama, vocab=vocab), tiny_workspace / "dataset",
                         tmp_path / "topk", vocab)
    rows = [{"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()}]
    with pytest.raises(HeadMismatch, match=r"^model 'distilled' \(llama\): logits from its LM head differ"):
        fidelity({"distilled": tiny_llama(0, RescalingLlama)}, tiny_llama(1), rows, pad_id=0)
    with pytest.raises(HeadMismatch, match=r"^teacher \(llama\): logits from its LM head differ"):
        fidelity({"distilled": tiny_llama(0)}, tiny_llama(1, RescalingLlama), rows, pad_id=0)
