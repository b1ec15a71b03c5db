"""The distill trainer: sft | lora | kd | neo in one loop, launched by torchrun.

    # one process (CPU)
    python -m llmneo.trainer --workdir runs/x/distill
    # two processes, gloo on CPU (what `llmneo distill` and the KFP component run)
    torchrun --standalone --nproc-per-node 2 -m llmneo.trainer --workdir runs/x/distill

The workdir holds ``config.yaml`` and ``inputs.json`` (dataset/teacher/student folders), written by
:func:`llmneo.steps.run_distill`; outputs go next to them: ``adapter/`` (lora, neo) or ``model/``
(sft, kd), ``train_log.jsonl``, ``card.json``.

Batching: a global batch of ``distill.global_batch_size`` sequences per optimizer step, whatever the
world size: each rank takes its contiguous share, in micro-batches, and the loss is divided by the
number of target tokens in the whole global batch, so 1 process and N processes compute the same
gradient (up to float summation order).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llmneo.config import Config, config_from_dict
from llmneo.data import IGNORE_INDEX, read_split
from llmneo.errors import UserError
from llmneo.losses import chunked_distill_loss, shift_mask
from llmneo.models import load_causal_lm, read_card, torch_dtype, write_card

LORA_METHODS = ("lora", "neo")
KD_METHODS = ("kd", "neo")


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face *ForCausalLM under DDP/peft wrappers (LoRA layers stay injected in it)."""
    if hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class DistillModule(nn.Module):
    """Student forward + NEO loss in one module, so DDP/FSDP wrap exactly what has gradients."""

    def __init__(self, student: nn.Module, cfg: Config, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        self.cfg = cfg.distill
        self._teacher = [teacher]  # a list: not registered as a submodule (frozen, not wrapped)

    def forward(self, input_ids, attention_mask, labels):
        base = unwrap(self.student)
        mask, targets = shift_mask(labels)
        teacher = self._teacher[0]
        teacher_hidden = None
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher.model(input_ids=input_ids, attention_mask=attention_mask)
                teacher_hidden = t_out.last_hidden_state[:, :-1][mask]
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        d = self.cfg
        sums = chunked_distill_loss(
            hidden[:, :-1][mask], targets, base.lm_head, teacher_hidden,
            teacher.lm_head if teacher is not None else None,
            alpha=d.alpha if teacher is not None else 0.0, temperature=d.temperature, kind=d.divergence,
            beta=d.jsd_beta, chunk_tokens=d.loss_chunk_tokens)
        return sums.loss, sums.ce, sums.kd


def lr_lambda(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warmup over ``warmup_ratio·total`` steps, then cosine to 0."""
    warmup = int(round(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def count_targets(rows: list[dict]) -> int:
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class DistillTrainer:
    """setup → train → save → cleanup (torchtune-style recipe)."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        import yaml

        self.cfg: Config = config_from_dict(yaml.safe_load((self.workdir / "config.yaml").read_text()))
        self.inputs = json.loads((self.workdir / "inputs.json").read_text())
        self.method = self.cfg.distill.method

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_distributed()
        self._setup_data()
        self._setup_model()
        self._setup_teacher()
        self._setup_optimizer()

    def _setup_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        d = self.cfg.distill
        if d.global_batch_size % (self.world * d.micro_batch_size):
            raise UserError(f"distill.global_batch_size={d.global_batch_size} must be a multiple of "
                            f"world size ({self.world}) × distill.micro_batch_size ({d.micro_batch_size})")
        self.accum = d.global_batch_size // (self.world * d.micro_batch_size)
        # same init on every rank (DDP also broadcasts rank 0's); dropout differs per rank
        random.seed(d.seed)
        torch.manual_seed(d.seed)

    def _setup_data(self) -> None:
        self.train_rows = read_split(self.inputs["dataset"], "train")
        if not self.train_rows:
            raise UserError(f"dataset {self.inputs['dataset']}: train split is empty")
        self.dataset_card = read_card(self.inputs["dataset"])

    def _setup_model(self) -> None:
        from transformers import AutoTokenizer

        d = self.cfg.distill
        student_dir = self.inputs["student"]
        self.tokenizer = AutoTokenizer.from_pretrained(student_dir)
        student = load_causal_lm(student_dir, dtype=torch.float32)
        if self.method in LORA_METHODS:
            from peft import LoraConfig, get_peft_model

            targets = d.lora_targets if d.lora_targets == "all-linear" else [
                t.strip() for t in d.lora_targets.split(",")]
            lcfg = LoraConfig(r=d.lora_rank, lora_alpha=d.lora_alpha, lora_dropout=d.lora_dropout,
                              target_modules=targets, task_type="CAUSAL_LM")
            student = get_peft_model(student, lcfg)
        student.to(self.device)
        student.train()
        self.student = student
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        module = DistillModule(student, self.cfg, None)
        if self.world > 1:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.module = module

    def _setup_teacher(self) -> None:
        teacher = None
        if self.method in KD_METHODS:
            dtype = torch_dtype(self.cfg.teacher.dtype, self.device.type)
            teacher = load_causal_lm(self.inputs["teacher"], dtype=dtype).to(self.device)
            teacher.eval()
            teacher.requires_grad_(False)
        unwrap_module = self.module.module if hasattr(self.module, "module") else self.module
        unwrap_module._teacher[0] = teacher

    def _setup_optimizer(self) -> None:
        d = self.cfg.distill
        self.optimizer = torch.optim.AdamW(self.trainable, lr=d.lr, weight_decay=d.weight_decay,
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, d.max_steps, d.warmup_ratio))

    # ------------------------------------------------------------------ data order
    def global_batch(self, step: int) -> list[dict]:
        """The rows of optimizer step ``step``: a seeded permutation per epoch, concatenated."""
        g, n = self.cfg.distill.global_batch_size, len(self.train_rows)
        rows = []
        for pos in range(step * g, (step + 1) * g):
            epoch, idx = divmod(pos, n)
            perm = list(range(n))
            random.Random(self.cfg.distill.seed * 1_000_003 + epoch).shuffle(perm)
            rows.append(self.train_rows[perm[idx]])
        return rows

    # ------------------------------------------------------------------ train
    def train(self) -> list[dict]:
        from tqdm import tqdm

        d = self.cfg.distill
        log_path = self.workdir / "train_log.jsonl"
        log_f = open(log_path, "w") if self.rank == 0 else None
        bar = tqdm(total=d.max_steps, desc=f"distill[{self.method}]", disable=self.rank != 0,
                   file=sys.stderr, dynamic_ncols=True)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else nullcontext())
        history = []
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for step in range(d.max_steps):
            t0 = time.time()
            batch = self.global_batch(step)
            n_tokens = count_targets(batch)
            share = len(batch) // self.world
            mine = batch[self.rank * share:(self.rank + 1) * share]
            ce_sum = torch.zeros((), device=self.device)
            kd_sum = torch.zeros((), device=self.device)
            seen_tokens = 0
            for micro in range(self.accum):
                rows = mine[micro * d.micro_batch_size:(micro + 1) * d.micro_batch_size]
                inputs = {k: v.to(self.device) for k, v in collate(rows, pad_id).items()}
                seen_tokens += int(inputs["attention_mask"].sum())
                sync = (nullcontext() if micro == self.accum - 1 or not hasattr(self.module, "no_sync")
                        else self.module.no_sync())
                with sync:
                    with autocast:
                        loss, ce, kd = self.module(**inputs)
                    # DDP averages gradients over ranks: scale by world / global target tokens
                    (loss * self.world / max(1, n_tokens)).backward()
                ce_sum += ce
                kd_sum += kd
            if self.world > 1:
                stats = torch.stack([ce_sum, kd_sum, torch.tensor(float(seen_tokens), device=self.device)])
                dist.all_reduce(stats)
                ce_sum, kd_sum, seen_tokens = stats[0], stats[1], int(stats[2])
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.trainable, d.max_grad_norm if d.max_grad_norm > 0 else float("inf"))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            dt = time.time() - t0
            ce_mean, kd_mean = float(ce_sum) / max(1, n_tokens), float(kd_sum) / max(1, n_tokens)
            alpha = d.alpha if self.method in KD_METHODS else 0.0
            record = {"step": step + 1, "loss": (1 - alpha) * ce_mean + alpha * d.temperature**2 * kd_mean,
                      "ce": ce_mean, "kd": kd_mean, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_per_s": seen_tokens / dt, "target_tokens": n_tokens,
                      "peak_mem_mb": peak_memory_mb(self.device), "seconds": dt}
            history.append(record)
            if log_f and ((step + 1) % d.log_every == 0 or step + 1 == d.max_steps):
                log_f.write(json.dumps(record) + "\n")
                log_f.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{ce_mean:.3f}", kd=f"{kd_mean:.3f}")
            bar.update(1)
        bar.close()
        if log_f:
            log_f.close()
        return history

    # ------------------------------------------------------------------ save
    def save(self, history: list[dict]) -> dict | None:
        if self.rank != 0:
            return None
        if self.method in LORA_METHODS:
            self.student.save_pretrained(self.workdir / "adapter")
        else:
            self.student.save_pretrained(self.workdir / "model", safe_serialization=True)
            self.tokenizer.save_pretrained(self.workdir / "model")
        d = self.cfg.distill
        last = history[-1]
        card = {
            "kind": "adapter" if self.method in LORA_METHODS else "model",
            "method": self.method, "steps": len(history), "world_size": self.world,
            "global_batch_size": d.global_batch_size, "alpha": d.alpha, "divergence": d.divergence,
            "lora_rank": d.lora_rank if self.method in LORA_METHODS else None,
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "final": {k: last[k] for k in ("loss", "ce", "kd")},
            "tokens_per_s": sum(h["tokens_per_s"] for h in history) / len(history),
            "peak_mem_mb": max(h["peak_mem_mb"] for h in history),
            "seconds": round(sum(h["seconds"] for h in history), 2),
            "dataset_hash": self.dataset_card.get("dataset_hash"),
        }
        return write_card(self.workdir, card)

    def cleanup(self, ok: bool = True) -> None:
        if dist.is_initialized():
            if ok:
                dist.barrier()  # rank 0 may still be saving
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    trainer = DistillTrainer(args.workdir)
    ok = False
    try:
        trainer.setup()
        history = trainer.train()
        trainer.save(history)
        ok = True
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        trainer.cleanup(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
