"""Distillation throughput, peak memory and GPU-busy time, one run, one table: sft / lora / kd / neo
with llmneo's trainer, NEO with a naive full-vocabulary fp32 KL, NEO from an offline top-k cache, and
TRL's GKDTrainer (β=0 = forward KL, λ=0 = no on-policy generation) on the same models, LoRA and batches.

    # CPU, tiny Llama shapes (~4 min per round on 2 cores)
    python benchmarks/bench_distill.py
    # GPU (needs CUDA): Llama-3.2-1B-shaped student, Llama-3.1-8B-shaped teacher, random init,
    # seq 2048, micro-batch 2, LoRA r=64 on all linear layers, bf16 autocast
    python benchmarks/bench_distill.py --gpu --only neo,kd,trl-gkd,neo-offline,neo-naive,lora --json out.json
    # the trainer's own micro-batch choice from a memory budget, torch.compile on (llmneo versions
    # that have distill.micro_batch_size=auto / distill.compile)
    python benchmarks/bench_distill.py --gpu --mbs auto --max-memory-gib 60 --compile true
    # where the time goes: per-config torch.profiler tables (CPU ops + kernels) into a folder
    python benchmarks/bench_distill.py --gpu --only neo,lora --steps 1 --profile-dir prof/
    # a subset, more steps, 3 rounds (median tokens/s) on a noisy machine
    python benchmarks/bench_distill.py --only neo,neo-naive,trl-gkd --steps 5 --repeat 3
    # both sides with activation checkpointing (TRL's SFTConfig default)
    python benchmarks/bench_distill.py --only neo-ac,trl-gkd-ac
    # seconds-long smoke run of every code path on CPU (tiny shapes; its numbers mean nothing)
    python benchmarks/bench_distill.py --smoke

Every configuration runs in its own process (so peak RSS is its own), builds the same seeded
random-init models in memory, runs ``--warmup`` optimizer steps, then times ``--steps`` steps.
tokens/s = input tokens of the timed steps / their wall time. Memory: on CPU the process's peak RSS
(whole process: imports, models, training) and the peak during the timed steps alone; on GPU
``torch.cuda.max_memory_allocated`` over the timed steps. Models are random-init, so only speed and
memory mean anything.

GPU busy (CUDA only): after the timed steps, ``--profile-steps`` more optimizer steps run under
``torch.profiler`` recording device activity only (CUPTI; no CPU-op tracing, so the host is barely
slowed). busy = the union of the time intervals in which a kernel, memcpy or memset ran on the
device (overlapping kernels on several streams count once) / the wall time of those steps (CUDA
synchronised before and after). 100 % means the device never waited for the host. With
``--profile-dir`` the profiled steps also trace CPU ops (for the tables), which slows the host: the
busy % of such a run is a lower bound.

Sync check (CUDA only, ``--no-sync-check`` turns it off): every micro-batch of llmneo's trainer (its
forward and backward, inside ``DistillTrainer._grad_sync``) runs under
``torch.cuda.set_sync_debug_mode("error")``, so an operation that makes the host wait for the device
(``.item()``, ``nonzero``, boolean indexing, ...) fails that configuration with the operation named.
Synchronising once per optimizer step (the logged numbers) is outside the micro-batches and allowed;
the warm-up steps are not checked (torch.compile and autotuning synchronise while they compile).
TRL's trainer is not checked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

CONFIGS = ("sft", "lora", "kd", "neo", "neo-naive", "neo-offline", "trl-gkd")
# not run by default: both sides with activation checkpointing (TRL's SFTConfig default); NEO with its
# frozen base kept in fp32 (distill.frozen_dtype=fp32; the default stores it in bf16 when training in bf16)
EXTRA_CONFIGS = ("neo-ac", "trl-gkd-ac", "neo-fp32base")
SHAPES = {
    # tiny Llama shapes that still have a Llama-like vocabulary (the logits are what KD costs)
    "cpu": {"student": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=False),
            "teacher": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, tie_word_embeddings=False),
            "vocab": 32000, "seq": 256, "micro_batch": 2, "global_batch": 4, "rows": 16, "lora_rank": 16},
    # Llama-3.2-1B / Llama-3.1-8B shapes
    "gpu": {"student": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
            "teacher": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
            "vocab": 128256, "seq": 2048, "micro_batch": 2, "global_batch": 8, "rows": 64, "lora_rank": 64},
    # seconds per configuration: checks that every code path of the bench runs (numbers mean nothing)
    "smoke": {"student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False),
              "teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False),
              "vocab": 512, "seq": 64, "micro_batch": 2, "global_batch": 4, "rows": 8, "lora_rank": 4},
}
TOPK = 64
PROMPT_FRACTION = 0.25  # share of each row that is prompt (label -100), as in instruction data


# --------------------------------------------------------------------------------------------
# Shared set-up (parent process): random token rows as a prepared dataset, a top-k cache
# --------------------------------------------------------------------------------------------


def build_model(shape: dict, role: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], max_position_embeddings=max(2048, shape["seq"]),
                         **shape[role])
    torch.manual_seed(1 if role == "teacher" else 2)
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    return model


def write_dataset(root: Path, shape: dict) -> None:
    from llmneo.cards import DatasetCard, ModelCard
    from llmneo.data_output import ParquetRows

    g = torch.Generator().manual_seed(0)
    rows = []
    prompt = int(shape["seq"] * PROMPT_FRACTION)
    for r in range(shape["rows"]):
        ids = torch.randint(3, shape["vocab"], (shape["seq"],), generator=g).tolist()
        rows.append({"row": r, "input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows), ("val", rows[:1])):
        out = ParquetRows(root / "dataset" / f"{split}.parquet")
        for row in part:
            out.add(row)
        out.commit()
    DatasetCard(dataset_hash="bench").write(root / "dataset")
    for role in ("teacher", "student"):
        ModelCard(role=role).write(root / role)


def write_topk_cache(root: Path, shape: dict, device: str) -> None:
    """What the teacher step does with teacher.mode=offline: top-k log-probs of every labelled position."""
    from llmneo.data import collate, read_split
    from llmneo.losses import shift_mask
    from llmneo.topk import TopKWriter

    teacher = build_model(shape, "teacher", device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    writer = TopKWriter(root / "teacher" / "topk", k=TOPK, vocab_size=shape["vocab"], extra={"dataset_hash": "bench"})
    for row in read_split(root / "dataset", "train"):
        batch = collate([row], pad_id=0)
        mask, _ = shift_mask(batch["labels"])
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"].to(device)).logits[0, :-1][mask[0].to(device)]
            values, ids = torch.log_softmax(logits.float(), -1).topk(TOPK, dim=-1)
        writer.add(ids, values)
    writer.close()
    del teacher


# --------------------------------------------------------------------------------------------
# Workers (one process per configuration)
# --------------------------------------------------------------------------------------------


_SETUP_PEAK_MB = 0.0


def training_peak_reset() -> None:
    """Remember the peak so far, then reset the kernel's peak-RSS counter (VmHWM) so that the timed
    steps' own peak can be read."""
    global _SETUP_PEAK_MB
    from llmneo.trainer import peak_rss_mb

    _SETUP_PEAK_MB = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_mb(device: str) -> tuple[float, float]:
    """(whole-process peak, peak of the timed steps) in MiB: GPU allocated, or RSS (VmHWM) on CPU."""
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        return peak, peak
    from llmneo.trainer import peak_rss_mb

    timed = peak_rss_mb()
    return max(_SETUP_PEAK_MB, timed), timed


def merged_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals: time covered by at least one of them."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def device_intervals(events) -> list[tuple[float, float]]:
    """``(start, end)`` in seconds of the device work (kernels, memcpy, memset) among a profiler's
    events; user annotations mirrored on the device timeline are not work."""
    from torch.autograd import DeviceType

    out = []
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        if "annotation" in str(getattr(e, "activity_type", "")) or e.name.startswith("ProfilerStep"):
            continue
        out.append((e.time_range.start / 1e6, e.time_range.end / 1e6))
    return out


def llmneo_overrides(name: str, shape: dict, mbs: str | None = None, compile_: str | None = None,
                     max_memory_gib: float | None = None) -> list[str]:
    """The configuration overrides of one llmneo configuration of the bench. ``mbs`` (an int or
    ``auto``), ``compile_`` and ``max_memory_gib`` become ``distill.micro_batch_size``,
    ``distill.compile`` and ``distill.max_memory_gib`` when given; absent, the trainer's defaults."""
    method = name.split("-")[0]
    out = [f"distill.method={method}", "distill.save_every=0",
           f"distill.global_batch_size={shape['global_batch']}",
           f"distill.micro_batch_size={mbs or shape['micro_batch']}", f"distill.lora_rank={shape['lora_rank']}",
           f"distill.lora_alpha={2 * shape['lora_rank']}", "distill.lora_dropout=0.0",
           "distill.lr=" + ("2.0e-5" if method in ("sft", "kd") else "2.0e-4")]
    if compile_ is not None:
        out.append(f"distill.compile={compile_}")
    if max_memory_gib is not None:
        out.append(f"distill.max_memory_gib={max_memory_gib}")
    out += {"neo-naive": ["distill.loss_impl=naive"], "neo-offline": ["teacher.mode=offline"],
            "neo-ac": ["distill.activation_checkpointing=true"], "neo-fp32base": ["distill.frozen_dtype=fp32"],
            }.get(name, [])
    return out


@contextmanager
def sync_errors(enabled: bool):
    """Inside: a CUDA operation that synchronises the host with the device raises (CUDA only)."""
    if not enabled:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def run_steps(trainer, first: int, count: int) -> list[dict]:
    return [trainer.train_step(step) for step in range(first, first + count)]


def profiled(run, device: str, steps: int, profile_table: Path | None) -> dict:
    """``run()`` (``steps`` optimizer steps) under torch.profiler; GPU-busy seconds and wall seconds
    (see the module's docstring), and with ``profile_table`` the key_averages tables written there."""
    if device != "cuda" or steps <= 0:
        return {}
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if profile_table else [])
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy = merged_seconds(device_intervals(prof.events()))
    if profile_table:
        averages = prof.key_averages()
        profile_table.write_text(
            f"{steps} profiled steps: wall {wall:.3f} s, device busy {busy:.3f} s ({100 * busy / wall:.1f} %)\n\n"
            + "=== by total device time\n" + averages.table(sort_by="device_time_total", row_limit=40)
            + "\n=== by self device time\n" + averages.table(sort_by="self_device_time_total", row_limit=40)
            + "\n=== by self CPU time\n" + averages.table(sort_by="self_cpu_time_total", row_limit=40))
    return {"profiled_steps": steps, "profiled_seconds": wall, "busy_seconds": busy, "busy_fraction": busy / wall}


def run_llmneo(name: str, root: Path, shape: dict, device: str, args) -> dict:
    from llmneo.config import load_config
    from llmneo.launch import TrainerInputs
    from llmneo.models import build_tiny_tokenizer
    from llmneo.trainer import DistillTrainer

    warmup, steps, extra = args.warmup, args.steps, args.profile_steps if device == "cuda" else 0
    overrides = llmneo_overrides(name, shape, args.mbs, args.compile, args.max_memory_gib)
    overrides.append(f"distill.max_steps={warmup + steps + extra}")
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    cfg = load_config("tiny", overrides)
    inputs = TrainerInputs.of(root / "dataset", root / "teacher", root / "student")
    check = device == "cuda" and not args.no_sync_check

    class BenchTrainer(DistillTrainer):
        guarded_micro_batches = 0
        sync_check = False  # on for the timed and profiled steps (warm-up may compile, autotune, probe)

        def load_tokenizer(self):
            return build_tiny_tokenizer()

        def load_student(self):
            return build_model(shape, "student", device, torch.float32)

        def load_teacher(self):
            return build_model(shape, "teacher", device, torch.bfloat16 if device == "cuda" else torch.float32)

        @contextmanager
        def _grad_sync(self, enabled: bool):  # one micro-batch's forward and backward
            with super()._grad_sync(enabled), sync_errors(self.sync_check):
                self.guarded_micro_batches += self.sync_check
                yield

    trainer = BenchTrainer(cfg, inputs, workdir)
    trainer.setup()
    run_steps(trainer, 0, warmup)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    training_peak_reset()
    trainer.sync_check = check
    records = run_steps(trainer, warmup, steps)
    whole, train_peak = memory_mb(device)
    table_file = Path(args.profile_dir) / f"prof-{name}.txt" if args.profile_dir else None
    busy = profiled(lambda: run_steps(trainer, warmup + steps, extra), device, extra, table_file)
    # the micro-batch the trainer ran with (distill.micro_batch_size=auto: its choice)
    chosen = getattr(trainer, "micro_batch_size", None) or trainer.d.micro_batch_size
    return {"tokens": sum(r["tokens"] for r in records), "seconds": sum(r["seconds"] for r in records),
            "peak_mb": whole, "train_peak_mb": train_peak, "loss": records[-1]["loss"],
            "micro_batch": chosen if isinstance(chosen, int) else str(chosen),
            "sync_check": ("on" if trainer.guarded_micro_batches else "not engaged") if check else "off",
            "guarded_micro_batches": trainer.guarded_micro_batches, **busy}


def run_trl(root: Path, shape: dict, device: str, args, checkpointing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from llmneo.data import collate, read_split
    from llmneo.models import build_tiny_tokenizer

    warmup, steps, extra = args.warmup, args.steps, args.profile_steps if device == "cuda" else 0
    rows = read_split(root / "dataset", "train")
    student = build_model(shape, "student", device, torch.float32)
    teacher = build_model(shape, "teacher", device, torch.bfloat16 if device == "cuda" else torch.float32)
    times: list[float] = []

    profiler: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            if state.global_step == warmup:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                training_peak_reset()
            if state.global_step == warmup + steps:  # the profiled steps (GPU busy), after the timed ones
                profiler["memory"] = memory_mb(device)
                if extra:
                    from torch.profiler import ProfilerActivity, profile

                    profiler["prof"] = profile(activities=[ProfilerActivity.CUDA])
                    profiler["prof"].start()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if state.global_step == warmup + steps + extra and "prof" in profiler:
                profiler["prof"].stop()

    accum = shape["global_batch"] // shape["micro_batch"]
    config = GKDConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=shape["micro_batch"],
        gradient_accumulation_steps=accum, max_steps=warmup + steps + extra, learning_rate=2e-4, lr_scheduler_type="cosine",
        max_grad_norm=1.0, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
        max_length=shape["seq"], logging_steps=10_000, save_strategy="no", report_to=[], seed=0,
        # TRL's SFTConfig defaults to activation checkpointing, llmneo's to none: set both alike
        gradient_checkpointing=checkpointing, bf16=device == "cuda", use_cpu=device != "cuda", dataloader_num_workers=0,
        disable_dropout=True)
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=config, processing_class=build_tiny_tokenizer(),
        train_dataset=Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]),
        data_collator=lambda batch: collate(batch, pad_id=0), callbacks=[StepTimer()],
        peft_config=LoraConfig(r=shape["lora_rank"], lora_alpha=2 * shape["lora_rank"], lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    whole, train_peak = profiler.get("memory") or memory_mb(device)
    busy = {}
    if "prof" in profiler:
        wall = sum(times[warmup + steps:])
        seconds = merged_seconds(device_intervals(profiler["prof"].events()))
        busy = {"profiled_steps": extra, "profiled_seconds": wall, "busy_seconds": seconds,
                "busy_fraction": seconds / wall}
    tokens = steps * shape["global_batch"] * shape["seq"]
    return {"tokens": tokens, "seconds": sum(times[warmup:warmup + steps]), "peak_mb": whole,
            "train_peak_mb": train_peak, "loss": None, "micro_batch": shape["micro_batch"], "sync_check": "off",
            **busy}


def worker(args) -> None:
    root, shape = Path(args.root), SHAPES[args.shape]
    device = "cuda" if args.shape == "gpu" else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    if args.worker.startswith("trl-gkd"):
        result = run_trl(root, shape, device, args, checkpointing=args.worker == "trl-gkd-ac")
    else:
        result = run_llmneo(args.worker, root, shape, device, args)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Parent: set up once, one subprocess per configuration, one table
# --------------------------------------------------------------------------------------------


def unsupported_overrides(args) -> list[str]:
    """The configuration keys that the requested options need and this llmneo does not have."""
    from llmneo.config import describe_fields

    keys = {k for k, *_ in describe_fields()}
    wanted = {"--compile": ("distill.compile", args.compile),
              "--max-memory-gib": ("distill.max_memory_gib", args.max_memory_gib)}
    out = [f"{opt} needs {key}" for opt, (key, value) in wanted.items() if value is not None and key not in keys]
    if args.mbs == "auto":
        from llmneo.config import load_config
        from llmneo.errors import UserError

        try:
            load_config("tiny", ["distill.micro_batch_size=auto"])
        except UserError:
            out.append("--mbs auto needs distill.micro_batch_size=auto")
    return out


def failure_line(stderr: str) -> str:
    """The line that says why a worker failed: the exception's message, else the last line."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    for line in reversed(lines):
        if line.startswith(("error:", "RuntimeError", "torch.OutOfMemoryError", "AcceleratorError")) or \
                "Error:" in line:
            return line[:500]
    return lines[-1][:500] if lines else "no output"


def write_json(path: str | None, device: str, shape: dict, args, results: dict, failures: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(
            {"device": device, "shape": shape, "torch": torch.__version__,
             "options": {"mbs": args.mbs or shape["micro_batch"], "compile": args.compile,
                         "max_memory_gib": args.max_memory_gib, "warmup": args.warmup, "steps": args.steps,
                         "profile_steps": args.profile_steps, "sync_check": not args.no_sync_check},
             "results": results, "failed": failures}, indent=2))


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    results = {}
    for name, rs in runs.items():
        if rs:  # median throughput; memory is deterministic up to allocator noise: report the largest
            results[name] = {**rs[-1], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                             "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
                             "peak_mb": max(r["peak_mb"] for r in rs),
                             "train_peak_mb": max(r["train_peak_mb"] for r in rs)}
            busy = [r["busy_fraction"] for r in rs if "busy_fraction" in r]
            if busy:
                results[name]["busy_fraction"] = statistics.median(busy)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Llama-3.2-1B / 3.1-8B shapes on CUDA")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the code paths in seconds")
    parser.add_argument("--only", default=",".join(CONFIGS),
                        help="comma-separated, from " + ",".join(CONFIGS + EXTRA_CONFIGS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mbs", default=None, metavar="N|auto",
                        help="micro-batch size (default: the shape's, 2); auto: the trainer's choice from "
                             "distill.max_memory_gib (TRL keeps the shape's)")
    parser.add_argument("--compile", default=None, choices=("auto", "true", "false"),
                        help="distill.compile for llmneo's trainer (default: the trainer's default)")
    parser.add_argument("--max-memory-gib", type=float, default=None, help="distill.max_memory_gib (with --mbs auto)")
    parser.add_argument("--profile-steps", type=int, default=1,
                        help="steps after the timed ones run under torch.profiler for the GPU-busy %% (CUDA)")
    parser.add_argument("--profile-dir", default=None,
                        help="write each configuration's profiler tables (CPU ops + kernels) here (CUDA)")
    parser.add_argument("--no-sync-check", action="store_true",
                        help="do not run micro-batches under torch.cuda.set_sync_debug_mode('error')")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole set N times round-robin; report the median tokens/s (noisy machines)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker on CPU (1: stable numbers on a shared machine)")
    parser.add_argument("--json", help="also write the results here (rewritten after every configuration)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from llmneo.report import table

    if args.mbs is not None and args.mbs != "auto" and not (args.mbs.isdigit() and int(args.mbs) > 0):
        print(f"error: --mbs: a positive integer or auto, got {args.mbs!r}", file=sys.stderr)
        return 2
    shape_name = "gpu" if args.gpu else "smoke" if args.smoke else "cpu"
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA device", file=sys.stderr)
        return 2
    missing = unsupported_overrides(args)
    if missing:
        print(f"error: this llmneo has no such setting: {'; '.join(missing)}", file=sys.stderr)
        return 2
    shape = SHAPES[shape_name]
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS + EXTRA_CONFIGS))
    if unknown:
        print(f"error: --only: unknown configuration(s) {unknown}; known: {', '.join(CONFIGS + EXTRA_CONFIGS)}",
              file=sys.stderr)
        return 2
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
        args.profile_dir = str(Path(args.profile_dir).resolve())
    device = torch.cuda.get_device_name() if args.gpu else f"CPU, {args.threads} threads"
    print(f"device: {device}; torch {torch.__version__}; student {shape['student']['hidden_size']}h×"
          f"{shape['student']['num_hidden_layers']}L, teacher {shape['teacher']['hidden_size']}h×"
          f"{shape['teacher']['num_hidden_layers']}L, vocab {shape['vocab']}, seq {shape['seq']}, "
          f"micro-batch {args.mbs or shape['micro_batch']}, global batch {shape['global_batch']}, "
          f"LoRA r={shape['lora_rank']} all-linear, {int(PROMPT_FRACTION * 100)}% prompt tokens; "
          f"{args.warmup} warm-up + {args.steps} timed steps"
          + (f" + {args.profile_steps} profiled (GPU busy)" if args.gpu else "")
          + (f"; compile={args.compile}" if args.compile else "")
          + ("; sync check off" if args.gpu and args.no_sync_check else ""), flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    failures: dict[str, str] = {}
    passed = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
              "--profile-steps", str(args.profile_steps)]
    for option, value in (("--mbs", args.mbs), ("--compile", args.compile), ("--max-memory-gib", args.max_memory_gib),
                          ("--profile-dir", args.profile_dir)):
        if value is not None:
            passed += [option, str(value)]
    if args.no_sync_check:
        passed.append("--no-sync-check")
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        root = Path(tmp)
        write_dataset(root, shape)
        if "neo-offline" in names:
            write_topk_cache(root, shape, "cuda" if args.gpu else "cpu")
            if args.gpu:
                torch.cuda.empty_cache()  # the workers need the whole device
        for attempt in range(args.repeat):
            for name in names:
                cmd = [sys.executable, __file__, "--worker", name, "--root", str(root), "--shape", shape_name, *passed]
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "TRL_EXPERIMENTAL_SILENCE": "1"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    failures[name] = f"exit {proc.returncode}: {failure_line(proc.stderr)}"
                    print(f"  [{attempt + 1}/{args.repeat}] {name:12s} failed ({failures[name]})\n"
                          f"{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                    write_json(args.json, device, shape, args, summarise(runs), failures)
                    continue
                r = json.loads(lines[-1][len("RESULT "):])
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                runs[name].append(r)
                busy = f"  GPU busy {100 * r['busy_fraction']:5.1f} %" if "busy_fraction" in r else ""
                print(f"  [{attempt + 1}/{args.repeat}] {name:12s} {r['tokens_per_s']:10.1f} tok/s  "
                      f"peak {r['peak_mb']:9.1f} MiB{busy}  micro-batch {r['micro_batch']}"
                      + (f"  sync check {r['sync_check']}" if args.gpu else ""), flush=True)
                write_json(args.json, device, shape, args, summarise(runs), failures)
    results = summarise(runs)

    print()
    if args.gpu:
        rows = [[n, r["micro_batch"], round(r["tokens_per_s"]), round(r["peak_mb"] / 1024, 1),
                 f"{100 * r['busy_fraction']:.0f}" if "busy_fraction" in r else "-",
                 round(r["seconds"] / args.steps, 3), r["sync_check"]] for n, r in results.items()]
        print(table(["config", "micro-batch", "tokens/s (median)", "peak GiB", "GPU busy %", "s/step",
                     "sync check"], rows))
    else:
        rows = [[n, round(r["tokens_per_s"], 1), round(r["peak_mb"]), round(r["train_peak_mb"]),
                 " ".join(str(x) for x in r["all_tokens_per_s"])] for n, r in results.items()]
        print(table(["config", "tokens/s (median)", "peak RSS MiB", "timed-steps peak MiB", "tokens/s per round"],
                    rows))
    for name, why in failures.items():
        print(f"{name}: FAILED, {why}")
    comparisons = [("neo", "neo-naive", "NEO: chunked KL vs naive full-vocab fp32 KL"),
                   ("neo", "trl-gkd", "NEO vs TRL GKDTrainer (goal: >= 1.3x tokens/s, <= 0.8x peak)"),
                   ("neo-offline", "neo", "NEO: offline top-k vs online teacher"),
                   ("neo", "kd", "NEO vs full KD"),
                   ("neo-ac", "trl-gkd-ac", "NEO vs TRL GKDTrainer, both with activation checkpointing"),
                   ("neo", "neo-fp32base", "NEO: frozen base in bf16 vs fp32")]
    print()
    for a, b, what in comparisons:
        if a in results and b in results:
            speed = results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
            memory = results[a]["peak_mb"] / results[b]["peak_mb"]
            print(f"{what}: {speed:.2f}x tokens/s, {memory:.2f}x peak memory")
    write_json(args.json, device, shape, args, results, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
