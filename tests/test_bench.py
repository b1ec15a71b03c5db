"""benchmarks/bench_distill.py's measuring helpers and benchmarks/gpu_check.sh's CPU mode, so that the
GPU tooling cannot rot where no GPU is at hand."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_distill", REPO / "benchmarks" / "bench_distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_busy_time_is_the_union_of_the_device_intervals():
    merged = _bench().merged_seconds
    # overlapping kernels on two streams count once; a gap is idle; a nested interval adds nothing
    assert merged([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.2, 5.8)]) == pytest.approx(4.0)
    assert merged([(3.0, 4.0), (0.0, 1.0)]) == pytest.approx(2.0)
    assert merged([]) == 0.0


def test_options_become_trainer_overrides_only_when_given():
    bench = _bench()
    shape = bench.SHAPES["gpu"]
    plain = bench.llmneo_overrides("neo-offline", shape)
    assert "distill.micro_batch_size=2" in plain and "teacher.mode=offline" in plain
    assert not any(o.startswith(("distill.compile", "distill.max_memory_gib")) for o in plain)
    tuned = bench.llmneo_overrides("kd", shape, mbs="auto", compile_="true", max_memory_gib=60.0)
    assert {"distill.micro_batch_size=auto", "distill.compile=true", "distill.max_memory_gib=60.0",
            "distill.method=kd", "distill.lr=2.0e-5"} <= set(tuned)


def test_a_worker_failure_is_reported_by_its_exception_line():
    stderr = ("Traceback (most recent call last):\n  File x\nRuntimeError: called a synchronizing CUDA operation\n"
              "[rank0]: something after\n")
    assert _bench().failure_line(stderr) == "RuntimeError: called a synchronizing CUDA operation"


@pytest.mark.integration
def test_gpu_check_cpu_mode_runs_the_step_clis_and_the_smoke_bench(tmp_path):
    """`gpu_check.sh --cpu`: the same script as on a GPU, tiny preset with gloo, smoke shapes."""
    out = tmp_path / "check"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", str(out)],
                          capture_output=True, text=True, env=env, timeout=1100, cwd=tmp_path)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-2000:] + proc.stderr[-2000:]
    for part in ("bench-mbs2", "prep", "teacher", "distill-ddp", "distill-fsdp", "distill-sigterm",
                 "distill-resume", "merge-eval"):
        assert f"{part}: ok" in summary, summary
    bench = json.loads((out / "bench-mbs2.json").read_text())
    assert set(bench["results"]) == {"neo", "lora"} and not bench["failed"]
    # resume after SIGTERM reaches the uninterrupted run's final loss exactly (gloo, CPU, same seeds)
    ddp = [json.loads(x) for x in (out / "distill-ddp" / "train_log.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (out / "distill-resume" / "train_log.jsonl").read_text().splitlines()]
    assert resumed[-1]["step"] == ddp[-1]["step"] and resumed[-1]["loss"] == ddp[-1]["loss"]
