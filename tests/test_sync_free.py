"""No device→host synchronisation inside a micro-batch: the ops that make the CPU wait for the GPU on
CUDA (a boolean mask's nonzero, ``.item()``/``float()``, ``torch.equal``...) are counted with a
``TorchDispatchMode`` over the forward + backward of every micro-batch of one tiny-preset train step,
on the CPU, and must be 0 for every method. The one synchronisation per optimizer step (the logged
numbers) lies outside the micro-batches and is not counted.

One is not ours and stays: transformers (5.24) builds the attention mask of every model forward in
``masking_utils.create_causal_mask``, whose ``find_packed_sequence_indices`` reads the position ids
on the device (``if (...).all()``) whenever no 2D attention mask is given, and whose
``_ignore_causal_mask_sdpa`` reads the 2D mask (``fast_all``) when one is. It is counted apart, by
the frame it comes from, and must be the only origin left (one per model forward)."""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmneo.config import load_config
from llmneo.launch import TrainerInputs, write_workdir
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


TRANSFORMERS_MASK = "transformers.masking_utils.find_packed_sequence_indices"


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
    ours = [(op, where) for op, where in zip(counter.ops, counter.origins, strict=True) if where != TRANSFORMERS_MASK]
    assert ours == [], f"{len(ours)} syncing ops: {sorted(set(ours))}"
    # transformers' mask creation: one read per model forward (student, and the online teacher)
    forwards = trainer.accum * (2 if method in ("kd", "neo") else 1)
    assert counter.ops == ["aten._local_scalar_dense.default"] * forwards
