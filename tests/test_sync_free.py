"""No device→host synchronisation inside a micro-batch: the ops that make the CPU wait for the GPU on
CUDA (a boolean mask's nonzero, ``.item()``/``float()``, ``torch.equal``...) are counted with a
``TorchDispatchMode`` over the forward + backward of every micro-batch of one tiny-preset train step,
on the CPU, and must be 0 for every method. The one synchronisation per optimizer step (the logged
numbers) lies outside the micro-batches and is not counted.

The mask transformers (5.24) builds in every model forward (``masking_utils.create_causal_mask``)
read the position ids or the mask on the device; :mod:`llmneo.attention` switches the models to a
causal SDPA for which no mask is built, so that is 0 too."""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmneo.attention import CAUSAL_SDPA, use_causal_attention
from llmneo.config import load_config
from llmneo.launch import TrainerInputs, write_workdir
from llmneo.lora import base_model
from llmneo.trainer import DistillTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

aten = torch.ops.aten
# ops whose CUDA kernels copy a result to the host (output size or a Python scalar)
SYNCING = {aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default,
           aten.is_nonzero.default, aten.equal.default, aten.allclose.default, aten.unique_dim.default,
           aten._unique2.default, aten.unique_consecutive.default, aten.bincount.default,
           aten.repeat_interleave.Tensor, aten.nonzero_numpy.default}
# these sync only with a boolean index (it is turned into nonzero)
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
            aten._index_put_impl_.default}


def origin() -> str:
    """module.function of the innermost caller outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("torch") and module != __name__:
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class SyncCounter(TorchDispatchMode):
    """Records the syncing ops dispatched while active: ``ops`` (name), ``origins`` (where from)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.origins: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in SYNCING:
            name = str(func)
        elif func in INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                name = f"{func}(bool)"
        if name:
            self.ops.append(name)
            self.origins.append(origin())
        return func(*args, **kwargs)


def test_counter_sees_a_boolean_mask_and_item():
    x, mask = torch.randn(4, 3, requires_grad=True), torch.tensor([True, False, True, False])
    with SyncCounter() as counter:
        x[mask].sum().backward()
        float(x.sum())
        x[torch.tensor([0, 2])].sum()  # integer indices: no sync
    assert counter.ops == ["aten.index.Tensor(bool)", "aten.index_put.default(bool)",
                           "aten._local_scalar_dense.default"]


def count_in_micro_batches(trainer: DistillTrainer) -> SyncCounter:
    """The syncing ops of one optimizer step's micro-batches (forward + backward), step 0."""
    counter = SyncCounter()
    original = trainer.micro_step

    def micro_step(*args, **kwargs):
        with counter:
            return original(*args, **kwargs)

    trainer.micro_step = micro_step
    trainer.train_step(0)
    return counter


@pytest.fixture(scope="module")
def offline_teacher(tiny_workspace, tmp_path_factory):
    """The teacher step's top-k cache (the tiny preset's k < V: the sparse tail path)."""
    from llmneo.steps import load_teacher

    out = tmp_path_factory.mktemp("offline") / "teacher"
    cfg = load_config("tiny", ["teacher.mode=offline"])
    load_teacher(cfg, tiny_workspace / "dataset", out, out.parent / "student-unused")
    return out


@pytest.mark.parametrize("method, overrides", [
    ("sft", ()), ("lora", ()), ("kd", ()), ("neo", ()), ("neo-offline", ()),
    ("neo", ("distill.loss_impl=naive",)), ("neo", ("distill.divergence=reverse_kl",)),
    ("neo-offline", ("distill.topk_tail=renormalize",))])
def test_no_sync_inside_a_micro_batch(method, overrides, tiny_workspace, offline_teacher, tmp_path):
    offline = method == "neo-offline"
    cfg = load_config("tiny", ["distill.method=neo" if offline else f"distill.method={method}",
                               "distill.max_steps=1", *(["teacher.mode=offline"] if offline else []), *overrides])
    teacher = offline_teacher if offline else tiny_workspace / "teacher"
    workdir = write_workdir(tmp_path, cfg, TrainerInputs.of(tiny_workspace / "dataset", teacher,
                                                            tiny_workspace / "student"))
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    assert trainer.accum >= 2  # several micro-batches are counted
    counter = count_in_micro_batches(trainer)
    assert base_model(trainer.student).config._attn_implementation == CAUSAL_SDPA
    assert counter.ops == [], f"{len(counter.ops)} syncing ops: {sorted(set(zip(counter.ops, counter.origins, strict=True)))}"


def test_transformers_reads_its_mask_on_the_device_without_the_causal_attention(tiny_workspace, tmp_path):
    """The counter sees transformers' own read (one per model forward, from
    ``masking_utils.find_packed_sequence_indices``) when the model keeps plain SDPA."""
    cfg = load_config("tiny", ["distill.method=neo", "distill.max_steps=1"])
    workdir = write_workdir(tmp_path, cfg, TrainerInputs.of(tiny_workspace / "dataset", tiny_workspace / "teacher",
                                                            tiny_workspace / "student"))
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    for model in (base_model(trainer.student), trainer.distill_module.signal.model):
        model.set_attn_implementation("sdpa")
    counter = count_in_micro_batches(trainer)
    assert counter.ops == ["aten._local_scalar_dense.default"] * (2 * trainer.accum)
    assert set(counter.origins) == {"transformers.masking_utils.find_packed_sequence_indices"}


def tiny_lm(kind: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, **{"attn_implementation": "sdpa", **extra})
    return model_cls(config)


def test_causal_attention_equals_the_masked_forward_on_right_padded_rows():
    model = tiny_lm("llama")
    ids = torch.randint(1, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        assert use_causal_attention(model) and model.config._attn_implementation == CAUSAL_SDPA
        got = model(input_ids=ids).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, extra", [("mistral", {"sliding_window": 4}), ("llama", {"attn_implementation": "eager"})])
def test_models_that_need_their_mask_keep_their_attention(kind, extra):
    """A sliding window (Mistral, Gemma 2/3's sliding layers) is not plain causal attention, and an
    implementation other than SDPA is left as the user chose it."""
    model = tiny_lm(kind, **extra)
    before = model.config._attn_implementation
    assert not use_causal_attention(model)
    assert model.config._attn_implementation == before


def test_a_model_whose_attention_differs_goes_back_to_sdpa(monkeypatch):
    """The set-up check is what decides: when the logits under the causal SDPA differ from the
    model's own masked forward (here: a model that ignores its mask's causality would), it keeps SDPA."""
    from llmneo import attention

    model = tiny_lm("llama")
    monkeypatch.setattr(attention, "_relative_error", lambda got, want: (1.0, 1.0, 1e-4))
    assert not attention.use_causal_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_packed_rows_keep_the_mask_transformers_builds(tiny_workspace, tmp_path):
    """Packed rows need the block-diagonal mask transformers builds from their restarting position
    ids: the trainer leaves the student's attention as it is."""
    from llmneo.steps import prepare_dataset

    cfg = load_config("tiny", ["data.packing=true", "distill.method=lora", "distill.max_steps=1"])
    prepare_dataset(cfg, tmp_path / "packed")
    workdir = write_workdir(tmp_path / "w", cfg, TrainerInputs.of(tmp_path / "packed", tiny_workspace / "teacher",
                                                                  tiny_workspace / "student"))
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    assert trainer.packed and base_model(trainer.student).config._attn_implementation == "sdpa"
