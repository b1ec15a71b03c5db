"""The distill trainer: sft | lora | kd | neo in one loop, launched by torchrun.

    # one process (CPU)
    python -m llmneo.trainer --workdir runs/x/distill
    # two processes, gloo on CPU (what `llmneo distill` and the KFP component run)
    torchrun --standalone --nproc-per-node 2 -m llmneo.trainer --workdir runs/x/distill

The workdir holds ``config.yaml`` and ``inputs.json`` (dataset/teacher/student folders), written by
:func:`llmneo.launch.write_workdir`; the entry point reads them with :meth:`DistillTrainer.from_workdir`
(in process: ``DistillTrainer(cfg, inputs, workdir)``); outputs go next to them: ``adapter/`` (lora, neo) or ``model/``
(sft, kd), ``train_log.jsonl``, ``tensorboard/``, ``loss_curve.png``, ``card.json`` (written last:
the run is complete), and while training ``checkpoint/`` (see :mod:`llmneo.checkpointing`).

Methods: sft = full-parameter CE; lora = LoRA branch, CE; kd = full-parameter student with the
teacher; neo = LoRA branch with the teacher, base frozen. Loss (1-α)·CE + α·T²·D(teacher‖student)
(:mod:`llmneo.losses`), teacher online (frozen, no_grad, bf16 on GPU) or offline (cached top-k,
``teacher.mode=offline``: no teacher is loaded).

Batching: a global batch of ``distill.global_batch_size`` sequences per optimizer step, whatever the
world size: each rank takes its contiguous share, in micro-batches, and the loss is divided by the
number of target tokens in the whole global batch, so 1 process and N processes compute the same
gradient (up to float summation order). The data order is a pure function of (seed, step), so the
data position of a checkpoint is just its step.

Training length: ``distill.max_steps`` optimizer steps, or ``distill.epochs`` passes over the train
split rounded up to whole steps (:meth:`llmneo.config.DistillConfig.total_steps`); rank 0 prints what
the run amounts to at start. ``distill.eval_every``: the training loss on the val split every N steps
and after the last (:meth:`DistillTrainer.validation_loss`, all ranks), logged as ``val_loss``.

Progress: one tqdm bar on rank 0, described ``[3/5 distill] neo`` when the step launcher sets
``LLMNEO_STEP_LABEL`` (:func:`llmneo.launch.launch_env`), with the terms that exist, lr and tokens/s
(:func:`progress_postfix`).

Preemption: SIGTERM/SIGINT set a flag; at the end of the current optimizer step all ranks agree,
save a checkpoint and exit with 128+signal. Re-running the same command resumes exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llmneo import cards, checkpointing
from llmneo.cards import DatasetCard, DistillCard
from llmneo.config import FINGERPRINT_SECTIONS, Config
from llmneo.data import IGNORE_INDEX, collate, read_split
from llmneo.errors import UserError, environment_error
from llmneo.heads import check_fast_paths, logits_head
from llmneo.launch import (
    STEP_LABEL_ENV,
    TrainerInputs,
    checkpoint_root,
    die_with_parent,
    read_workdir,
    report_error,
)
from llmneo.lora import apply_lora, base_model, save_adapter
from llmneo.losses import LossSpec, chunked_distill_loss, gather_positions, selected_loss, target_positions
from llmneo.models import load_causal_lm, torch_dtype
from llmneo.preflight import check_gpus
from llmneo.signals import CachedTopK, OnlineTeacher, TeacherSignal

LORA_METHODS = ("lora", "neo")
KD_METHODS = ("kd", "neo")


class NonFiniteTraining(UserError):
    """Training produced a non-finite loss or gradient norm more often than allowed."""


class Preempted(Exception):
    """Raised on every rank after the checkpoint of a SIGTERM/SIGINT stop is written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step


# --------------------------------------------------------------------------------------------
# The model that DDP/FSDP wrap: student forward + loss
# --------------------------------------------------------------------------------------------


class DistillModule(nn.Module):
    """Student forward + NEO loss in one module, so DDP/FSDP wrap exactly what has gradients.

    The loss is ``spec`` (:class:`llmneo.losses.LossSpec`); the teacher is a signal
    (:mod:`llmneo.signals`) held outside the module tree (frozen, never wrapped or sharded). ``spec``
    in effect (:attr:`spec`) has alpha = 0 while no signal is set."""

    def __init__(self, student: nn.Module, spec: LossSpec):
        super().__init__()
        self.student = student
        self.configured_spec = spec
        self._signal: list[TeacherSignal | None] = [None]  # a list: not registered as a submodule
        self.set_signal(None)

    @property
    def signal(self) -> TeacherSignal | None:
        return self._signal[0]

    def set_signal(self, signal: TeacherSignal | None) -> None:
        self._signal[0] = signal
        self.spec = self.configured_spec.with_teacher(signal is not None)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, target_index=None,
                target_ids=None, **signal_rows):
        """Sums over the micro-batch's target tokens: (loss, ce, kd). Packed rows come with
        ``position_ids`` and no ``attention_mask`` (:func:`llmneo.data.collate`); ``signal_rows``
        are what the signal added to the batch (:meth:`TeacherSignal.batch_rows`). ``target_index`` /
        ``target_ids``: :func:`llmneo.losses.target_positions` of ``labels``, computed on the host by
        :func:`device_batch` (else here, which makes a device wait for the mask's size)."""
        spec, signal = self.spec, self._signal[0]
        inputs = {"input_ids": input_ids, "use_cache": False}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        elif attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if target_index is None:
            target_index, target_ids = target_positions(labels)
        chunked = spec.loss_impl == "chunked"
        teacher = signal.targets(inputs, target_index, signal_rows, chunked=chunked) if signal is not None else None
        if not chunked:  # full [B, L, V] fp32 logits: the reference / benchmark baseline
            logits = gather_positions(self.student(**inputs).logits, target_index).float()
            sums = selected_loss(logits, target_ids, teacher, spec)
            return sums.loss, sums.ce, sums.kd
        base = base_model(self.student)
        hidden = gather_positions(base.get_decoder()(**inputs).last_hidden_state, target_index)
        sums = chunked_distill_loss(hidden, target_ids, logits_head(base), teacher, spec)
        return sums.loss, sums.ce, sums.kd


def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated micro-batch (:func:`llmneo.data.collate`, on the host) ready for
    :meth:`DistillModule.forward` on ``device`` without any device→host synchronisation:

    - the positions to train on are selected here, from the labels on the host
      (:func:`llmneo.losses.target_positions`);
    - the ``attention_mask`` of plain rows is dropped: rows are right-padded and attention is causal,
      so no labelled position ever sees the padding, and without a mask transformers takes the causal
      kernel path instead of reading the mask on the device to find that out (packed rows keep
      their ``position_ids``: transformers still inspects those on the device);
    - tensors are copied with ``non_blocking=True`` (from pinned memory on CUDA)."""
    batch = dict(batch)
    batch["target_index"], batch["target_ids"] = target_positions(batch["labels"])
    batch.pop("attention_mask", None)
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def lr_lambda(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warmup over ``warmup_ratio·total`` steps, then cosine to 0."""
    warmup = int(round(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def count_targets(rows: list[dict]) -> int:
    """Next-token positions with a label (what the loss averages over)."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM of its own address space (``ru_maxrss`` would
    include the parent's peak when it was started by vfork+exec, as subprocess and torchrun do)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; other systems: an estimate


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def progress_postfix(record: dict, with_teacher: bool) -> dict[str, str]:
    """The progress bar's postfix for a step's log record: the loss, its CE and KD terms only when
    there is a KD term (``with_teacher``: sft/lora, or alpha 0, have loss = CE), the learning rate the
    step used, tokens/s, and the latest validation loss when the step has one."""
    postfix = {"loss": f"{record['loss']:.3f}"}
    if with_teacher:
        postfix.update(ce=f"{record['ce']:.3f}", kd=f"{record['kd']:.3f}")
    if "val_loss" in record:
        postfix["val"] = f"{record['val_loss']:.3f}"
    postfix.update({"lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"})
    return postfix


def training_hash(cfg: Config, dataset_hash: str | None) -> str:
    """What a checkpoint's numbers depend on: :meth:`Config.fingerprint` of the data/teacher/student/
    distill sections and the prepared dataset. Resuming under a different hash is refused."""
    return cfg.fingerprint(FINGERPRINT_SECTIONS, extra={"dataset_hash": dataset_hash})


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class DistillTrainer:
    """setup → train → save → cleanup (torchtune-style recipe).

    Subclasses may override :meth:`load_student`, :meth:`load_teacher` and :meth:`load_tokenizer`
    (the benchmark builds random-init models in memory that way)."""

    def __init__(self, cfg: Config, inputs: TrainerInputs, workdir: str | Path):
        self.workdir = Path(workdir)
        self.cfg = cfg
        self.inputs = inputs
        self.d = self.cfg.distill
        self.method = self.d.method
        self.checkpoint_root = checkpoint_root(cfg, self.workdir)
        self.dataset_card = DatasetCard.read(self.inputs.dataset)
        self.config_hash = training_hash(self.cfg, self.dataset_card.dataset_hash)
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.teacher: nn.Module | None = None
        self.topk = None
        self.start_step = 0
        self.history: list[dict] = []
        self.resumed_from: int | None = None
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient norm
        self._stop_signal: int | None = None

    @classmethod
    def from_workdir(cls, workdir: str | Path) -> DistillTrainer:
        """The trainer of a work folder written by :func:`llmneo.launch.write_workdir` (torchrun's entry)."""
        cfg, inputs = read_workdir(workdir)
        return cls(cfg, inputs, workdir)

    def already_complete(self) -> bool:
        """A previous attempt finished with the same configuration (e.g. a KFP retry after the step
        itself succeeded): nothing to do."""
        out = self.workdir / ("adapter" if self.method in LORA_METHODS else "model")
        if not self.d.resume or not cards.exists(self.workdir) or not out.is_dir():
            return False
        try:
            return DistillCard.read(self.workdir).complete_for(self.config_hash)
        except UserError:
            return False  # a garbled card is a stale one

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_distributed()
        self._setup_data()
        self._setup_model()
        self._setup_teacher()
        self._setup_optimizer()
        self._setup_micro_batch()
        self._setup_resume()

    def _setup_distributed(self) -> None:
        check_gpus()  # GPUs requested but not visible: one line, never a silent CPU fallback
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.rank != 0:  # one weight-loading bar per run (rank 0's), not one per process
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        d = self.d
        if d.global_batch_size % self.world:
            raise UserError(f"distill.global_batch_size={d.global_batch_size} must be a multiple of "
                            f"world size ({self.world})")
        self.per_rank = d.global_batch_size // self.world
        if d.micro_batch_size == "auto":  # set for real once the models exist (_setup_micro_batch)
            self._set_micro_batch(max(m for m in (1, 2) if self.per_rank % m == 0))
        elif self.per_rank % d.micro_batch_size:
            raise UserError(f"distill.global_batch_size={d.global_batch_size} must be a multiple of "
                            f"world size ({self.world}) × distill.micro_batch_size ({d.micro_batch_size})")
        else:
            self._set_micro_batch(d.micro_batch_size)
        self.bf16 = bf16 = d.precision == "bf16" or (d.precision == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext())
        # the same seed on every rank: identical initialization (LoRA A, MoSLoRA mixer) everywhere
        random.seed(d.seed)
        torch.manual_seed(d.seed)

    def _setup_data(self) -> None:
        self.train_rows = read_split(self.inputs.dataset, "train")
        if not self.train_rows:
            raise UserError(f"dataset {self.inputs.dataset}: train split is empty")
        self.targets_per_row = [count_targets([r]) for r in self.train_rows]
        self.max_steps = self.d.total_steps(len(self.train_rows))
        self.val_rows = read_split(self.inputs.dataset, "val") if self.d.eval_every else []
        self.val_targets = [count_targets([r]) for r in self.val_rows]
        self.packed = "position_ids" in self.train_rows[0]  # data.packing: rows of several examples
        if self.rank == 0:
            note = "" if self.val_rows or not self.d.eval_every else "; distill.eval_every: the val split is empty"
            print(f"distill: {self.d.length_line(len(self.train_rows))}{note}", file=sys.stderr, flush=True)
        self.tokenizer = self.load_tokenizer()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._perms: dict[int, list[int]] = {}

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        from llmneo.models import model_location

        return AutoTokenizer.from_pretrained(model_location(self.inputs.student)[0])

    def load_student(self) -> nn.Module:
        """The base student in fp32 (master weights; autocast computes in bf16 on GPU)."""
        return load_causal_lm(self.inputs.student, dtype=torch.float32)

    def load_teacher(self) -> nn.Module:
        """The teacher in ``teacher.dtype`` (auto: bf16 on GPU, fp32 on CPU)."""
        return load_causal_lm(self.inputs.teacher, dtype=torch_dtype(self.cfg.teacher.dtype, self.device.type))

    def _setup_model(self) -> None:
        d = self.d
        student = self.load_student()
        if self.method in LORA_METHODS:
            student = apply_lora(student, d)
        base = base_model(student)
        if self.method in LORA_METHODS and self.frozen_dtype() == torch.bfloat16:
            # autocast computes in bf16 anyway: storing the frozen base in bf16 halves its memory and
            # saves a cast of every weight in every forward (and recomputation). Tied weights stay tied.
            for p in student.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        if d.activation_checkpointing:  # non-reentrant: works with a frozen base and with FSDP2
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        student.to(self.device)
        with self.autocast:  # the fast paths compute the model's own logits (llmneo.heads), or refuse
            check_fast_paths(base, "student", head=d.loss_impl == "chunked", packed=self.packed)
        student.train()
        if self.compiles():
            # regional compilation: each decoder layer on its own (in place, parameters unchanged), so
            # compile time is that of one layer; the mask creation and the loss stay eager
            for layer in getattr(base.get_decoder(), "layers", []):
                layer.compile()
        self.student = student
        self.distill_module = module = DistillModule(student, LossSpec.from_config(d))
        if self.world > 1 and d.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # one FSDP unit per decoder layer (all-gathered just in time), the rest (embeddings,
            # final norm, head: the loss uses them directly) in the root unit
            for layer in getattr(base.get_decoder(), "layers", []):
                fully_shard(layer)
            fully_shard(module)
        elif self.world > 1:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.module = module
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.trainable_count = sum(p.numel() for p in student.parameters() if p.requires_grad)
        # dropout masks differ per rank (restored from the checkpoint on resume)
        torch.manual_seed(d.seed + 1 + self.rank)

    def compiles(self) -> bool:
        """``distill.compile``: auto = on for CUDA, off on CPU (compile time outweighs its gain there)."""
        choice = self.d.compile
        return self.device.type == "cuda" if choice == "auto" else bool(choice)

    def frozen_dtype(self) -> torch.dtype:
        """The frozen base's dtype under lora/neo: ``distill.frozen_dtype``; auto = bf16 when training in
        bf16 without FSDP (fully_shard wants one dtype per sharded unit), else fp32."""
        choice = self.d.frozen_dtype
        if choice == "auto":
            choice = "bf16" if self.bf16 and not (self.world > 1 and self.d.strategy == "fsdp") else "fp32"
        return torch.bfloat16 if choice == "bf16" else torch.float32

    def _setup_teacher(self) -> None:
        if self.method not in KD_METHODS:
            return
        if self.cfg.teacher.mode == "offline":
            self.topk = self._open_topk_cache()
            self.distill_module.set_signal(CachedTopK(self.topk, self.targets_per_row))
            return
        teacher = self.load_teacher().to(self.device)
        teacher.eval()
        teacher.requires_grad_(False)
        check_fast_paths(teacher, "teacher", head=self.d.loss_impl == "chunked", packed=self.packed)
        student_vocab = base_model(self.student).get_output_embeddings().out_features
        if teacher.get_output_embeddings().out_features < student_vocab:
            raise UserError(f"teacher {self.inputs.teacher}: vocabulary smaller than the student's ({student_vocab})")
        self.teacher = teacher
        self.distill_module.set_signal(OnlineTeacher(teacher))

    def _open_topk_cache(self):
        from llmneo.topk import META, TopKCache

        path = Path(self.inputs.teacher) / "topk"
        if not (path / META).is_file():
            raise UserError(f"teacher.mode=offline: no top-k cache in {path} (the teacher step writes it "
                            f"when teacher.mode=offline; re-run that step)")
        cache = TopKCache(path)
        if cache.meta.get("split", "train") != "train" or len(cache) != len(self.train_rows):
            raise UserError(f"{path}: top-k cache holds {len(cache)} rows of split {cache.meta.get('split')!r}, "
                            f"the dataset's train split has {len(self.train_rows)}: re-run the teacher step")
        student_vocab = base_model(self.student).get_output_embeddings().out_features
        if cache.vocab_size > student_vocab:
            raise UserError(f"{path}: top-k cache over a vocabulary of {cache.vocab_size}, the student has "
                            f"{student_vocab}: re-run the teacher step with this student")
        cached_hash, ours = cache.meta.get("dataset_hash"), self.dataset_card.dataset_hash
        if cached_hash and ours and cached_hash != ours:
            raise UserError(f"{path}: top-k cache was computed for dataset {cached_hash}, this dataset is "
                            f"{ours}: re-run the teacher step")
        return cache

    def _setup_optimizer(self) -> None:
        d = self.d
        self.optimizer = torch.optim.AdamW(self.trainable, lr=d.lr, weight_decay=d.weight_decay,
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, self.max_steps, d.warmup_ratio))

    def _set_micro_batch(self, size: int) -> None:
        self.micro_batch_size = size
        self.accum = self.per_rank // size

    def _setup_micro_batch(self) -> None:
        """``distill.micro_batch_size=auto`` on CUDA: the largest divisor of the per-process batch whose
        forward + backward on the longest train rows peaks within ``distill.max_memory_gib`` (0: 90% of
        the device), AdamW's two fp32 moments of the trainable weights added (allocated at the first
        step). All ranks take the smallest fit. On CPU auto stays at 2 (or 1)."""
        if self.d.micro_batch_size != "auto" or self.device.type != "cuda":
            return
        budget = self.d.max_memory_gib * 2**30 or 0.9 * torch.cuda.get_device_properties(self.device).total_memory
        budget -= 2 * 4 * sum(p.numel() for p in self.trainable)
        longest = sorted(range(len(self.train_rows)), key=lambda i: -len(self.train_rows[i]["input_ids"]))
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
        chosen = 1
        for size in sorted((m for m in range(1, self.per_rank + 1) if self.per_rank % m == 0), reverse=True):
            if size == 1:
                break
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                rows = [longest[i % len(longest)] for i in range(size)]
                self.micro_step(self.micro_batch(rows), 1, last=False)
                fits = torch.cuda.max_memory_allocated(self.device) <= budget
            except torch.OutOfMemoryError:
                fits = False
            self.optimizer.zero_grad(set_to_none=True)
            if self.world > 1:
                flag = torch.tensor([int(fits)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                fits = bool(flag)
            if fits:
                chosen = size
                break
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._set_micro_batch(chosen)
        if self.rank == 0:
            print(f"distill: micro_batch_size=auto: {chosen} sequences per process (budget "
                  f"{budget / 2**30:.1f} GiB)", file=sys.stderr, flush=True)

    def _choose_checkpoint(self, skip: dict[str, str]) -> Path | None:
        """Rank 0 picks the newest checkpoint that verifies (:func:`checkpointing.select`) and tells
        the others, so that every rank loads the same one."""
        choice, error = -1, None
        if self.rank == 0:
            try:
                path = checkpointing.select(self.checkpoint_root, skip)
                choice = -1 if path is None else checkpointing.step_of(path)
            except UserError as e:
                choice, error = -2, e
        if self.world > 1:
            flag = torch.tensor([choice], dtype=torch.int64, device=self.device)
            dist.broadcast(flag, src=0)
            choice = int(flag)
        if choice == -2:
            raise error or checkpointing.CheckpointInvalid(
                f"{self.checkpoint_root}: no valid checkpoint (see rank 0's message)")
        return None if choice == -1 else self.checkpoint_root / f"step-{choice:06d}"

    def _setup_resume(self) -> None:
        if not self.d.resume:
            return
        failed: dict[str, str] = {}  # folder name -> why it did not load (select's warning names it)
        while (path := self._choose_checkpoint(failed)) is not None:
            state = checkpointing.verify_state(path)
            if state["config_hash"] != self.config_hash:
                raise UserError(f"{path}: checkpoint of a different configuration or dataset (hash "
                                f"{state['config_hash']}, now {self.config_hash}); use a fresh output folder "
                                f"or distill.resume=false")
            try:
                checkpointing.load(path, self.module, self.optimizer, self.rank, self.device)
            except checkpointing.CheckpointInvalid as e:  # verified, yet does not load: try an older one
                failed[path.name] = str(e)
                continue
            self.scheduler.load_state_dict(state["scheduler"])
            self.start_step = self.resumed_from = state["step"]
            self.history = state["history"]
            self.nonfinite_steps = sum(1 for r in self.history if r.get("skipped"))
            if self.rank == 0:
                print(f"distill: resuming from {path} (step {self.start_step}/{self.max_steps})",
                      file=sys.stderr, flush=True)
            return

    # ------------------------------------------------------------------ data order
    def global_batch(self, step: int) -> list[int]:
        """Train-row indices of optimizer step ``step``: a seeded permutation per epoch, concatenated."""
        g, n = self.d.global_batch_size, len(self.train_rows)
        out = []
        for pos in range(step * g, (step + 1) * g):
            epoch, idx = divmod(pos, n)
            if epoch not in self._perms:
                perm = list(range(n))
                random.Random(self.d.seed * 1_000_003 + epoch).shuffle(perm)
                self._perms = {epoch: perm}
            out.append(self._perms[epoch][idx])
        return out

    def micro_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([self.train_rows[i] for i in indices], self.pad_id)
        if self.distill_module.signal is not None:
            batch.update(self.distill_module.signal.batch_rows(indices))
        return device_batch(batch, self.device)

    # ------------------------------------------------------------------ train
    def _grad_sync(self, enabled: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        if hasattr(self.module, "set_requires_gradient_sync"):  # FSDP2
            self.module.set_requires_gradient_sync(enabled)
            return nullcontext()
        if hasattr(self.module, "no_sync") and not enabled:  # DDP
            return self.module.no_sync()
        return nullcontext()

    def micro_step(self, inputs: dict[str, torch.Tensor], n_tokens: int, last: bool):
        """Forward + backward of one micro-batch (gradients accumulate); returns its (ce, kd) sums as
        device tensors. ``last``: the step's last micro-batch, where DDP/FSDP reduce the gradients."""
        with self._grad_sync(last):
            with self.autocast:
                loss, ce, kd = self.module(**inputs)
            # DDP/FSDP average gradients over ranks: scale by world / global target tokens
            (loss * self.world / max(1, n_tokens)).backward()
        return ce, kd

    def train_step(self, step: int) -> dict:
        """One optimizer step over the global batch of ``step``; returns its log record."""
        d = self.d
        t0 = time.perf_counter()
        batch = self.global_batch(step)
        n_tokens = sum(self.targets_per_row[i] for i in batch)
        share = len(batch) // self.world
        mine = batch[self.rank * share:(self.rank + 1) * share]
        ce_sum = torch.zeros((), device=self.device)
        kd_sum = torch.zeros((), device=self.device)
        seen_tokens = 0
        for micro in range(self.accum):
            rows = mine[micro * self.micro_batch_size:(micro + 1) * self.micro_batch_size]
            seen_tokens += sum(len(self.train_rows[i]["input_ids"]) for i in rows)
            ce, kd = self.micro_step(self.micro_batch(rows), n_tokens, last=micro == self.accum - 1)
            ce_sum += ce
            kd_sum += kd
        if self.world > 1:
            stats = torch.stack([ce_sum, kd_sum, torch.tensor(float(seen_tokens), device=self.device)])
            dist.all_reduce(stats)
            ce_sum, kd_sum, seen_tokens = stats[0], stats[1], int(stats[2])
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.trainable, d.max_grad_norm if d.max_grad_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        # the loss sums are all-reduced and the norm is global: every rank takes the same decision
        grad_norm = float(grad_norm)  # also waits for the GPU: the timing below is real
        ce_mean, kd_mean = float(ce_sum) / max(1, n_tokens), float(kd_sum) / max(1, n_tokens)
        finite = all(map(math.isfinite, (ce_mean, kd_mean, grad_norm)))
        if finite:
            self.optimizer.step()
        else:
            self._nonfinite(step, ce_mean, kd_mean, grad_norm)
        with warnings.catch_warnings():  # torch warns when the first step of all is a skipped one
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()  # also on a skipped step: the schedule stays a function of the step
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": self.distill_module.spec.combine(ce_mean, kd_mean),
                  "ce": ce_mean, "kd": kd_mean, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": seen_tokens / dt, "tokens": seen_tokens, "target_tokens": n_tokens,
                  "peak_mem_mb": peak_memory_mb(self.device), "seconds": dt}
        return record if finite else {**record, "skipped": True}

    def _nonfinite(self, step: int, ce: float, kd: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm is NaN/inf is never applied: skipped while
        ``distill.max_nonfinite_steps`` allows, else training stops (no adapter, no card)."""
        self.nonfinite_steps += 1
        what = f"ce={ce}, kd={kd}, grad_norm={grad_norm}"
        if self.nonfinite_steps > self.d.max_nonfinite_steps:
            raise NonFiniteTraining(
                f"distill: non-finite loss or gradient at step {step + 1} ({what}); training stopped, nothing "
                f"written (check distill.lr and the data; a corrupt checkpoint: distill.resume=false; "
                f"distill.max_nonfinite_steps={self.d.max_nonfinite_steps} skipped steps allowed)")
        if self.rank == 0:
            print(f"distill: warning: step {step + 1} skipped, non-finite ({what}); "
                  f"{self.nonfinite_steps}/{self.d.max_nonfinite_steps} allowed", file=sys.stderr, flush=True)

    def validation_loss(self) -> dict[str, float]:
        """The training loss on the val split, per target token: ``val_loss``, ``val_ce`` and, with an
        online teacher, ``val_kd`` (the top-k cache of ``teacher.mode=offline`` holds the train split
        only, so there val_loss is the CE). Collective: each rank takes every world-th micro-batch and
        the sums are all-reduced, so 1 and N processes give the same value."""
        module, rows, mb = self.distill_module, self.val_rows, self.micro_batch_size
        batches = [list(range(i, min(i + mb, len(rows)))) for i in range(0, len(rows), mb)]
        mine = batches[self.rank::self.world]
        signal = module.signal
        online = isinstance(signal, OnlineTeacher)
        if not online:
            module.set_signal(None)
        spec = module.spec
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # ce, kd, target tokens
        self.student.eval()
        try:
            with torch.no_grad():
                # every rank runs the same number of forwards: FSDP all-gathers in each one
                for i in range(math.ceil(len(batches) / self.world)):
                    indices = mine[i] if i < len(mine) else batches[0]
                    batch = collate([rows[j] for j in indices], self.pad_id)
                    with self.autocast:
                        _, ce, kd = module(**device_batch(batch, self.device))
                    if i < len(mine):
                        sums += torch.stack([torch.as_tensor(ce, dtype=torch.float64, device=self.device),
                                             torch.as_tensor(kd, dtype=torch.float64, device=self.device),
                                             torch.tensor(float(sum(self.val_targets[j] for j in indices)),
                                                          dtype=torch.float64, device=self.device)])
        finally:
            self.student.train()
            if not online:
                module.set_signal(signal)
        if self.world > 1:
            dist.all_reduce(sums)
        tokens = max(1.0, float(sums[2]))
        ce, kd = float(sums[0]) / tokens, float(sums[1]) / tokens
        out = {"val_loss": spec.combine(ce, kd), "val_ce": ce}
        if online:
            out["val_kd"] = kd
        return out

    def _logged(self, record: dict) -> bool:
        """Records written to train_log.jsonl: every log_every-th step, the last and every validation."""
        return record["step"] % self.d.log_every == 0 or record["step"] == self.max_steps or "val_loss" in record

    def _validates(self, step: int) -> bool:
        d = self.d
        return bool(d.eval_every and self.val_rows and (step % d.eval_every == 0 or step == self.max_steps))

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> int:
        """The signal that asked to stop, agreed by all ranks (0 = keep going)."""
        flag = torch.tensor([self._stop_signal or 0], dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def train(self) -> list[dict]:
        from tqdm import tqdm

        d = self.d
        previous = [signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)]
        log_f = tb = None
        if self.rank == 0:
            log_f = open(self.workdir / "train_log.jsonl", "w")  # rewritten: a resumed run drops later lines
            for record in self.history:
                if self._logged(record):
                    log_f.write(json.dumps(record) + "\n")
            tb = self._tensorboard()
        label = os.environ.get(STEP_LABEL_ENV)
        bar = tqdm(total=self.max_steps, initial=self.start_step,
                   desc=f"[{label}] {self.method}" if label else f"distill[{self.method}]",
                   disable=self.rank != 0, file=sys.stderr, dynamic_ncols=True)
        with_teacher = self.distill_module.spec.alpha > 0
        try:
            for step in range(self.start_step, self.max_steps):
                record = self.train_step(step)
                if self._validates(record["step"]):
                    record.update(self.validation_loss())
                self.history.append(record)
                if log_f and self._logged(record):
                    log_f.write(json.dumps(record) + "\n")
                    log_f.flush()
                if tb:
                    for key in ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
                        tb.add_scalar(f"train/{key}", record[key], record["step"])
                    for key in ("val_loss", "val_ce", "val_kd"):
                        if key in record:
                            tb.add_scalar(f"val/{key.removeprefix('val_')}", record[key], record["step"])
                bar.set_postfix(progress_postfix(record, with_teacher))
                bar.update(1)
                stop = self._stop_requested()
                periodic = d.save_every and record["step"] % d.save_every == 0 and record["step"] < self.max_steps
                if stop or periodic:
                    self.save_checkpoint(record["step"])
                if stop:
                    raise Preempted(stop, record["step"])
        finally:
            bar.close()
            if log_f:
                log_f.close()
            if tb:
                tb.close()
            for s, handler in zip((signal.SIGTERM, signal.SIGINT), previous, strict=True):
                signal.signal(s, handler)
        return self.history

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed attempt logged after its last checkpoint are dropped
        return SummaryWriter(str(self.workdir / "tensorboard"), purge_step=self.start_step + 1)

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, step: int) -> Path:
        state = {"step": step, "data_position": {"step": step, "rows_consumed": step * self.d.global_batch_size},
                 "scheduler": self.scheduler.state_dict(), "history": self.history,
                 "config_hash": self.config_hash, "world_size": self.world, "method": self.method}
        return checkpointing.save(self.checkpoint_root, step, self.module, self.optimizer, state, self.rank,
                                  self.device, keep=self.d.keep_last_checkpoints)

    def save(self, history: list[dict]) -> DistillCard | None:
        """Final weights (adapter/ or model/), loss curve, card.json (last). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        lora = self.method in LORA_METHODS
        # full (unsharded) tensors on rank 0, gathered from FSDP shards when sharded
        state = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora))
        card = None
        if self.rank == 0:
            state = {k.removeprefix("student."): v for k, v in state.items()}
            if lora:
                save_adapter(self.student, self.workdir / "adapter", state)
            else:
                self.student.save_pretrained(self.workdir / "model", state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(self.workdir / "model")
            card = self._write_card(history)
        if dist.is_initialized():
            dist.barrier()
        if not self.d.keep_checkpoint and self.rank == 0:
            import shutil

            shutil.rmtree(self.checkpoint_root, ignore_errors=True)
        return card

    def _write_card(self, history: list[dict]) -> DistillCard:
        from llmneo.report import plot_loss

        d = self.d
        png = plot_loss(history, self.workdir / "loss_curve.png")
        last = next((h for h in reversed(history) if not h.get("skipped")), history[-1])
        seconds = sum(h["seconds"] for h in history)
        val_history = [{k: h[k] for k in ("step", "val_loss", "val_ce", "val_kd") if k in h}
                       for h in history if "val_loss" in h]
        card = DistillCard(
            kind="adapter" if self.method in LORA_METHODS else "model",
            status="complete", method=self.method, steps=len(history), world_size=self.world,
            strategy=d.strategy if self.world > 1 else "single", global_batch_size=d.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            alpha=d.alpha, temperature=d.temperature, divergence=d.divergence,
            teacher_mode=self.cfg.teacher.mode if self.method in KD_METHODS else None,
            topk_tail=d.topk_tail if self.topk is not None else None,
            lora_variant=d.lora_variant if self.method in LORA_METHODS else None,
            lora_rank=d.lora_rank if self.method in LORA_METHODS else None,
            trainable_parameters=self.trainable_count,
            final={k: last[k] for k in ("loss", "ce", "kd")},
            tokens_per_s=sum(h["tokens"] for h in history) / max(seconds, 1e-9),
            peak_mem_mb=max(h["peak_mem_mb"] for h in history),
            seconds=round(seconds, 2), resumed_from_step=self.resumed_from,
            nonfinite_steps_skipped=self.nonfinite_steps,
            loss_curve=png.name if png else None,
            val_loss=val_history[-1]["val_loss"] if val_history else None, val_history=val_history,
            dataset_hash=self.dataset_card.dataset_hash, config_hash=self.config_hash,
        )
        return card.write(self.workdir)

    def cleanup(self, barrier: bool = True) -> None:
        if dist.is_initialized():
            if barrier:
                dist.barrier()  # rank 0 may still be saving
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: never outlive it as an orphan
        die_with_parent(signal.SIGKILL, os.getppid())
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        trainer = DistillTrainer.from_workdir(args.workdir)
    except UserError as e:
        if rank0:
            report_error(str(e))
        return 2
    if trainer.already_complete():
        if rank0:
            print(f"distill: {args.workdir} already holds a complete run of this configuration; nothing to do",
                  file=sys.stderr)
        return 0
    if rank0:  # a stale card (other configuration, earlier run) must not outlive a failed training
        cards.remove(args.workdir)
    barrier = False
    try:
        trainer.setup()
        history = trainer.train()
        trainer.save(history)
        barrier = True
    except Preempted as e:
        barrier = True
        if rank0:
            print(f"distill: {e}; checkpoint saved in {trainer.checkpoint_root}; re-run to resume",
                  file=sys.stderr)
        return 128 + e.signum
    except UserError as e:
        if rank0:
            report_error(str(e))
        return 2
    except Exception as e:  # a full disk, a denied permission: one line; other errors keep their traceback
        mapped = environment_error(e, trainer.workdir)
        if mapped is None:
            raise
        if rank0:
            report_error(str(mapped))
        return 2
    finally:
        trainer.cleanup(barrier)
    return 0


if __name__ == "__main__":
    sys.exit(main())
