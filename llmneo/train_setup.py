"""Set-up of a training run: process group, data, student (LoRA, compile, FSDP/DDP), teacher signal,
optimizer and the micro-batch size (:class:`SetupMixin`, a part of :class:`llmneo.trainer.DistillTrainer`)."""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llmneo.attention import use_causal_attention
from llmneo.data import read_split
from llmneo.errors import UserError
from llmneo.heads import check_fast_paths
from llmneo.lora import apply_lora, base_model
from llmneo.losses import LossSpec
from llmneo.models import load_causal_lm, torch_dtype
from llmneo.preflight import check_gpus
from llmneo.signals import CachedTopK, OnlineTeacher
from llmneo.train_step import DistillModule, count_targets, lr_lambda

LORA_METHODS = ("lora", "neo")
KD_METHODS = ("kd", "neo")


class SetupMixin:
    """setup() and its parts; subclasses may override :meth:`load_student`, :meth:`load_teacher` and
    :meth:`load_tokenizer` (the benchmark builds random-init models in memory that way)."""

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
            # no mask built and read on the device in every forward (llmneo.attention); packed rows need theirs
            if not self.packed:
                use_causal_attention(base)
        student.train()
        if self.compiles():
            # regional compilation: each decoder layer on its own (in place, parameters unchanged), so
            # compile time is that of one layer; the mask creation and the loss stay eager
            for layer in getattr(base.get_decoder(), "layers", []):
                layer.compile()
        self.student = student
        self.distill_module = module = DistillModule(student, dataclasses.replace(LossSpec.from_config(d), compiled=self.compiles()))
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
        if not self.packed:
            use_causal_attention(teacher)
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

