"""Data-prep throughput and peak memory on synthetic Infinity-Instruct-like JSONL (ShareGPT format).

    python benchmarks/bench_prep.py           # the README table: 20k and 200k rows, SmolLM2 tokenizer (~20 min)
    python benchmarks/bench_prep.py --rows 20000 --baseline-rows 20000 --buffer-mb 32   # ~2 min
    python benchmarks/bench_prep.py --tokenizer tiny --rows 5000 --baseline-rows

Each measurement runs `llmneo.data.run_prep` in a fresh child process and reads the child's own peak
RSS (``os.wait4`` → ``ru_maxrss``), so runs do not see each other's memory. Printed side by side:

- ``floor``: a child that only imports llmneo and loads the tokenizer (what every run pays);
- ``streaming``: this implementation (external shuffle, row-group Parquet writes), once per
  ``--buffer-mb`` (``data.buffer_mb``: records held in memory before a sorted run is spilled);
- ``baseline``: the foundation's in-memory implementation (every row in Python lists), loaded from
  git (``--baseline-rev``), on the sizes in ``--baseline-rows``.

1% of the synthetic rows are broken JSON and 1% are exact duplicates, so the reject path is timed too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOUNDATION_REV = "f95b168"  # the commit whose llmneo/data.py held all rows in lists
WORDS = ("the of and to in is that for it as was with be by on not this are or from at which but have an they "
         "you were all we their when there can more if no out so what up about into than them some could time "
         "only new other how then its also two after first well way even because any these give most us model "
         "data train value system answer question explain example result number").split()


def synthetic_jsonl(path: Path, rows: int, seed: int = 0) -> Path:
    """ShareGPT rows (from/value, 1-3 turns, ~100 tokens per row on average), 1% broken, 1% duplicated."""
    rng = random.Random(seed)

    def para(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    previous = None
    with open(path, "w") as f:
        for i in range(rows):
            r = rng.random()
            if r < 0.01:
                f.write('{"conversations": [{"from": "human", "value": "broken\n')
                continue
            if r < 0.02 and previous:
                f.write(previous)
                continue
            turns = []
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                turns += [{"from": "human", "value": para(5, 30)}, {"from": "gpt", "value": para(10, 60)}]
            previous = json.dumps({"id": i, "conversations": turns}) + "\n"
            f.write(previous)
    return path


def child(args) -> None:
    """Runs in the measured process: load the tokenizer, then prep (or nothing, for the floor)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llmneo.config import load_config
    from llmneo.models import build_tiny_tokenizer, load_tokenizer, smollm2_dir

    tok = build_tiny_tokenizer() if args.tokenizer == "tiny" else load_tokenizer(smollm2_dir())
    if args.impl == "floor":
        print(json.dumps({}))
        return
    cfg = load_config("tiny", [f"data.source={args.source}", f"data.max_length={args.max_length}",
                               "data.val_fraction=0.01", f"data.buffer_mb={args.buffer_mb[0]}"])
    if args.impl == "baseline":
        source = subprocess.run(["git", "show", f"{args.baseline_rev}:llmneo/data.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        module = types.ModuleType("baseline_data")
        exec(compile(source, f"{args.baseline_rev}:llmneo/data.py", "exec"), module.__dict__)
        run_prep = module.run_prep
    else:
        from llmneo.data import run_prep
    t0 = time.time()
    card = run_prep(cfg, tok, args.out)
    print(json.dumps({"seconds": time.time() - t0, "kept": card.counts["kept"],
                      "rejected": card.counts["rejected"], "tokens": card.tokens["total"]}))


def measure(impl: str, source: Path | None, out: Path, args, buffer_mb: float = 32) -> dict:
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--tokenizer", args.tokenizer,
           "--buffer-mb", str(buffer_mb),
           "--max-length", str(args.max_length), "--baseline-rev", args.baseline_rev,
           "--source", str(source or ""), "--out", str(out)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} run failed (exit {proc.returncode}); rerun the child command to see why:\n"
                         + " ".join(cmd))
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--baseline-rows", type=int, nargs="*", default=[20_000, 200_000],
                        help="sizes to run the in-memory baseline on (it is slow and grows with rows)")
    parser.add_argument("--baseline-rev", default=FOUNDATION_REV)
    parser.add_argument("--tokenizer", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--buffer-mb", type=float, nargs="+", default=[32.0, 4.0],
                        help="data.buffer_mb values to run the streaming prep with")
    parser.add_argument("--workdir", default=None, help="where to write the synthetic data (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="streaming", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.buffer_mb = [float(mb) for mb in args.buffer_mb]
    if args.tokenizer == "smollm2":
        sys.path.insert(0, str(REPO))
        from llmneo.models import smollm2_dir

        smollm2_dir()  # convert once here, not inside a measured child
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    floor = measure("floor", None, work / "floor", args)["peak_rss_mib"]
    results = []
    for rows in args.rows:
        src = synthetic_jsonl(work / f"synthetic-{rows}.jsonl", rows)
        runs = [("streaming", mb, f"streaming {mb:g} MB") for mb in args.buffer_mb]
        runs += [("baseline", 0, "baseline")] if rows in args.baseline_rows else []
        for impl, mb, label in runs:
            r = measure(impl, src, work / f"out-{impl}-{mb:g}-{rows}", args, buffer_mb=mb or 32)
            results.append({"rows": rows, "impl": label, **r})
            print(f"  {label:18s} {rows:>8,d} rows: {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB",
                  file=sys.stderr, flush=True)
    print(f"\nprep benchmark: synthetic ShareGPT JSONL, tokenizer {args.tokenizer}, max_length {args.max_length}, "
          f"{os.cpu_count()} CPUs; floor (imports + tokenizer) = {floor:.0f} MiB peak RSS\n")
    header = f"| {'rows':>8} | {'impl':18} | {'seconds':>7} | {'rows/s':>7} | {'tokens/s':>9} | " \
             f"{'peak RSS MiB':>12} | {'above floor':>11} | {'kept':>7} | {'rejected':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        print(f"| {r['rows']:>8,d} | {r['impl']:18} | {r['seconds']:7.1f} | {r['rows'] / r['seconds']:7.0f} | "
              f"{r['tokens'] / r['seconds']:9.0f} | {r['peak_rss_mib']:12.0f} | {r['peak_rss_mib'] - floor:11.0f} | "
              f"{r['kept']:7,d} | {r['rejected']:8,d} |")


if __name__ == "__main__":
    main()
