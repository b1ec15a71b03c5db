"""Distillation throughput and peak memory, one run, one table: sft / lora / kd / neo with llmneo's
trainer, NEO with a naive full-vocabulary fp32 KL, NEO from an offline top-k cache, and TRL's
GKDTrainer (β=0 = forward KL, λ=0 = no on-policy generation) on the same models, LoRA and batches.

    # CPU, tiny Llama shapes (~4 min per round on 2 cores)
    python benchmarks/bench_distill.py
    # GPU (needs CUDA): Llama-3.2-1B-shaped student, Llama-3.1-8B-shaped teacher, random init,
    # seq 2048, micro-batch 2, LoRA r=64 on all linear layers, bf16 autocast
    python benchmarks/bench_distill.py --gpu
    # a subset, more steps, 3 rounds (median tokens/s) on a noisy machine
    python benchmarks/bench_distill.py --only neo,neo-naive,trl-gkd --steps 5 --repeat 3
    # both sides with activation checkpointing (TRL's SFTConfig default)
    python benchmarks/bench_distill.py --only neo-ac,trl-gkd-ac

Every configuration runs in its own process (so peak RSS is its own), builds the same seeded
random-init models in memory, runs ``--warmup`` optimizer steps, then times ``--steps`` steps.
tokens/s = input tokens of the timed steps / their wall time. Memory: on CPU the process's peak RSS
(whole process: imports, models, training) and the peak during the timed steps alone; on GPU
``torch.cuda.max_memory_allocated``. Models are random-init, so only speed and memory mean anything.
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


def run_llmneo(name: str, root: Path, shape: dict, device: str, warmup: int, steps: int) -> dict:
    from llmneo.config import load_config
    from llmneo.launch import TrainerInputs
    from llmneo.models import build_tiny_tokenizer
    from llmneo.trainer import DistillTrainer

    method = name.split("-")[0]
    overrides = [f"distill.method={method}", f"distill.max_steps={warmup + steps}", "distill.save_every=0",
                 f"distill.global_batch_size={shape['global_batch']}",
                 f"distill.micro_batch_size={shape['micro_batch']}", f"distill.lora_rank={shape['lora_rank']}",
                 f"distill.lora_alpha={2 * shape['lora_rank']}", "distill.lora_dropout=0.0",
                 "distill.lr=" + ("2.0e-5" if method in ("sft", "kd") else "2.0e-4")]
    if name == "neo-naive":
        overrides.append("distill.loss_impl=naive")
    if name == "neo-offline":
        overrides.append("teacher.mode=offline")
    if name == "neo-ac":
        overrides.append("distill.activation_checkpointing=true")
    if name == "neo-fp32base":
        overrides.append("distill.frozen_dtype=fp32")
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    cfg = load_config("tiny", overrides)
    inputs = TrainerInputs.of(root / "dataset", root / "teacher", root / "student")

    class BenchTrainer(DistillTrainer):
        def load_tokenizer(self):
            return build_tiny_tokenizer()

        def load_student(self):
            return build_model(shape, "student", device, torch.float32)

        def load_teacher(self):
            return build_model(shape, "teacher", device, torch.bfloat16 if device == "cuda" else torch.float32)

    trainer = BenchTrainer(cfg, inputs, workdir)
    trainer.setup()
    for step in range(warmup):
        trainer.train_step(step)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    training_peak_reset()
    records = [trainer.train_step(step) for step in range(warmup, warmup + steps)]
    whole, train_peak = memory_mb(device)
    return {"tokens": sum(r["tokens"] for r in records), "seconds": sum(r["seconds"] for r in records),
            "peak_mb": whole, "train_peak_mb": train_peak, "loss": records[-1]["loss"]}


def run_trl(root: Path, shape: dict, device: str, warmup: int, steps: int, checkpointing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from llmneo.data import collate, read_split
    from llmneo.models import build_tiny_tokenizer

    rows = read_split(root / "dataset", "train")
    student = build_model(shape, "student", device, torch.float32)
    teacher = build_model(shape, "teacher", device, torch.bfloat16 if device == "cuda" else torch.float32)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            if state.global_step == warmup:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                training_peak_reset()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    accum = shape["global_batch"] // shape["micro_batch"]
    args = GKDConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=shape["micro_batch"],
        gradient_accumulation_steps=accum, max_steps=warmup + steps, learning_rate=2e-4, lr_scheduler_type="cosine",
        max_grad_norm=1.0, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
        max_length=shape["seq"], logging_steps=10_000, save_strategy="no", report_to=[], seed=0,
        # TRL's SFTConfig defaults to activation checkpointing, llmneo's to none: set both alike
        gradient_checkpointing=checkpointing, bf16=device == "cuda", use_cpu=device != "cuda", dataloader_num_workers=0,
        disable_dropout=True)
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, processing_class=build_tiny_tokenizer(),
        train_dataset=Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]),
        data_collator=lambda batch: collate(batch, pad_id=0), callbacks=[StepTimer()],
        peft_config=LoraConfig(r=shape["lora_rank"], lora_alpha=2 * shape["lora_rank"], lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    whole, train_peak = memory_mb(device)
    tokens = steps * shape["global_batch"] * shape["seq"]
    return {"tokens": tokens, "seconds": sum(times[warmup:]), "peak_mb": whole, "train_peak_mb": train_peak,
            "loss": None}


def worker(args) -> None:
    root, shape = Path(args.root), SHAPES[args.shape]
    device = "cuda" if args.shape == "gpu" else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    if args.worker.startswith("trl-gkd"):
        result = run_trl(root, shape, device, args.warmup, args.steps, checkpointing=args.worker == "trl-gkd-ac")
    else:
        result = run_llmneo(args.worker, root, shape, device, args.warmup, args.steps)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Parent: set up once, one subprocess per configuration, one table
# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Llama-3.2-1B / 3.1-8B shapes on CUDA")
    parser.add_argument("--only", default=",".join(CONFIGS),
                        help="comma-separated, from " + ",".join(CONFIGS + EXTRA_CONFIGS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole set N times round-robin; report the median tokens/s (noisy machines)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker on CPU (1: stable numbers on a shared machine)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from llmneo.report import table

    shape_name = "gpu" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA device", file=sys.stderr)
        return 2
    shape = SHAPES[shape_name]
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS + EXTRA_CONFIGS))
    if unknown:
        print(f"error: --only: unknown configuration(s) {unknown}; known: {', '.join(CONFIGS + EXTRA_CONFIGS)}",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if args.gpu else f"CPU, {args.threads} threads"
    print(f"device: {device}; student {shape['student']['hidden_size']}h×{shape['student']['num_hidden_layers']}L, "
          f"teacher {shape['teacher']['hidden_size']}h×{shape['teacher']['num_hidden_layers']}L, vocab {shape['vocab']}, "
          f"seq {shape['seq']}, micro-batch {shape['micro_batch']}, global batch {shape['global_batch']}, "
          f"LoRA r={shape['lora_rank']} all-linear, {int(PROMPT_FRACTION * 100)}% prompt tokens; "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        root = Path(tmp)
        write_dataset(root, shape)
        if "neo-offline" in names:
            write_topk_cache(root, shape, "cuda" if args.gpu else "cpu")
            if args.gpu:
                torch.cuda.empty_cache()  # the workers need the whole device
        for attempt in range(args.repeat):
            for name in names:
                cmd = [sys.executable, __file__, "--worker", name, "--root", str(root), "--shape", shape_name,
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "TRL_EXPERIMENTAL_SILENCE": "1"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                r = json.loads(lines[-1][len("RESULT "):])
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                runs[name].append(r)
                print(f"  [{attempt + 1}/{args.repeat}] {name:12s} {r['tokens_per_s']:10.1f} tok/s  "
                      f"peak {r['peak_mb']:9.1f} MiB", flush=True)
    results = {}
    for name, rs in runs.items():
        if rs:  # median throughput; memory is deterministic up to allocator noise: report the largest
            results[name] = {**rs[-1], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                             "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
                             "peak_mb": max(r["peak_mb"] for r in rs),
                             "train_peak_mb": max(r["train_peak_mb"] for r in rs)}

    mem = "peak GPU MiB" if args.gpu else "peak RSS MiB"
    rows = [[n, round(r["tokens_per_s"], 1), round(r["peak_mb"]), round(r["train_peak_mb"]),
             " ".join(str(x) for x in r["all_tokens_per_s"])] for n, r in results.items()]
    print()
    print(table(["config", "tokens/s (median)", mem, "timed-steps peak MiB", "tokens/s per round"], rows))
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
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "shape": shape, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
