"""Peak memory and time of the fidelity evaluation with a large vocabulary: llmneo's chunked
computation (logits for ``eval.chunk_tokens`` positions at a time) vs the full-logits baseline.

    python benchmarks/bench_fidelity_memory.py                   # vocab 128256 (Llama 3), CPU
    python benchmarks/bench_fidelity_memory.py --vocab 49152 --seq 256

Each mode runs in its own subprocess so that its peak resident memory (CPU) or peak allocated
memory (CUDA) is its own. Models are tiny random-init Llamas with the given vocabulary: the point is
the ``[tokens, vocab]`` logits, which dominate memory at large vocabularies.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_mode(mode: str, vocab: int, seq: int, batch: int, rows: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from llmneo.config import TinyModelConfig
    from llmneo.data import collate
    from llmneo.evaluate import fidelity
    from llmneo.models import build_tiny_llama

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = build_tiny_llama(TinyModelConfig(hidden_size=64, num_layers=2, seed=1), vocab).to(device).eval()
    student = build_tiny_llama(TinyModelConfig(hidden_size=64, num_layers=1, seed=2), vocab).to(device).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, vocab, (seq,), generator=g).tolist(),
             "labels": [-100] * (seq // 4) + torch.randint(0, vocab, (seq - seq // 4,), generator=g).tolist()}
            for _ in range(rows)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    if mode == "chunked":
        out = fidelity({"student": student}, teacher, data, 0, batch_size=batch, chunk_tokens=chunk)["student"]
    else:  # baseline: full [B, L, V] fp32 logits of both models, then the same metrics
        kl = n = 0.0
        with torch.no_grad():
            for start in range(0, rows, batch):
                b = {k: v.to(device) for k, v in collate(data[start:start + batch], 0).items()}
                mask = b["labels"][:, 1:] != -100
                s = student(input_ids=b["input_ids"]).logits.float()[:, :-1][mask]
                t = teacher(input_ids=b["input_ids"]).logits.float()[:, :-1][mask]
                kl += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"))
                n += int(mask.sum())
        out = {"kl_to_teacher": kl / n}
    seconds = time.time() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "device": device.type, "seconds": round(seconds, 2), "peak_mib": round(peak / 2**20),
            "kl_to_teacher": out["kl_to_teacher"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=256, help="eval.chunk_tokens")
    parser.add_argument("--mode", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.vocab, args.seq, args.batch, args.rows, args.chunk)))
        return 0
    results = []
    for mode in ("full", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, *sys.argv[1:]], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    from llmneo.report import table

    print(f"fidelity eval: vocab {args.vocab}, {args.rows} rows × {args.seq} tokens, batch {args.batch}, "
          f"chunk {args.chunk} tokens")
    print(table(["mode", "device", "seconds", "peak MiB", "KL(teacher||student)"],
                [[r["mode"], r["device"], r["seconds"], r["peak_mib"], r["kl_to_teacher"]] for r in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
