"""End to end: the tiny DAG through kfp.local, real torchrun (2 processes, gloo)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import llmneo_run_process
from llmneo.registry import verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    run_dir, proc = llmneo_run_process(root, "tiny", "distill.max_steps=3")
    return root, run_dir, proc.stdout + proc.stderr


def test_default_output_is_a_line_per_step_and_the_summary(tiny_run):
    root, run, out = tiny_run
    lines = out.splitlines()
    assert len(lines) <= 40, out
    assert "\x1b[" not in out  # not a terminal: no colour codes
    assert "executor_input" not in out and "Warning" not in out and "fatal:" not in out
    for number, (task, label) in enumerate([("generate-answers", "teacher answers"), ("prep-data", "data prep"),
                                            ("load-teacher", "teacher loading"),
                                            ("distill", "NEO distill"), ("merge-eval", "merge and eval"),
                                            ("register", "register")], 1):
        log = run / "logs" / f"{task}.log"
        start, end = [line for line in lines if line.startswith(f"[{number}/6] {label}")]
        assert start.endswith(f"(log: {log.relative_to(root)})") and " done in " in end
        assert "Got executor_input" in log.read_text() and "\x1b[" not in log.read_text()
    assert "3 steps × 8 sequences = 0.42 epochs of 57 train rows" in out  # the distill start line
    distill_log = (run / "logs" / "distill.log").read_text()
    assert "distill: 3 steps × 8 sequences" in distill_log and "[4/6 distill] neo: 100%" in distill_log


def test_artifacts_exist(tiny_run):
    _, run, out = tiny_run
    for rel in ("prep-data/dataset/train.parquet", "prep-data/dataset/val.parquet", "prep-data/dataset/card.json",
                "prep-data/dataset/rejects.jsonl", "load-teacher/teacher/config.json",
                "load-teacher/student/config.json", "distill/adapter/adapter/adapter_model.safetensors",
                "distill/adapter/train_log.jsonl", "merge-eval/model/model.safetensors",
                "merge-eval/model/eval.json", "merge-eval/model/report.md", "merge-eval/model/README.md",
                "merge-eval/report"):
        assert (run / rel).exists(), rel
    assert "registered model:" in out and "NEO distill" in out


def test_adapter_changed_and_base_did_not(tiny_run):
    _, run, _ = tiny_run
    adapter = load_file(run / "distill/adapter/adapter/adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # B starts at zero: it trained
    base = load_file(run / "load-teacher/student/model.safetensors")
    merged = load_file(run / "merge-eval/model/model.safetensors")
    cfg = json.loads((run / "distill/adapter/adapter/adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    for name, w in base.items():
        key = name.removesuffix(".weight")
        a = [v for k, v in adapter.items() if k.endswith(key + ".lora_A.weight")]
        b = [v for k, v in adapter.items() if k.endswith(key + ".lora_B.weight")]
        if a:  # merged = frozen base + scale·B·A exactly: the base itself did not move
            assert torch.allclose(merged[name], w + scale * b[0] @ a[0], atol=1e-6), name
        else:
            assert torch.equal(merged[name], w), f"{name} changed but it has no adapter"


def test_registry_manifest_verifies(tiny_run):
    root, _, _ = tiny_run
    (manifest_path,) = list((root / "registry").glob("tiny-neo/v*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    verify(manifest_path.parent, manifest)
    assert {f["path"] for f in manifest["files"]} >= {"model.safetensors", "config.json", "eval.json"}
    lineage = manifest["lineage"]
    assert lineage["pipeline_run_id"] and lineage["config_hash"] and lineage["dataset_hash"]


def test_metrics_finite(tiny_run):
    _, run, _ = tiny_run
    result = json.loads((run / "merge-eval/model/eval.json").read_text())
    for row in result["fidelity"].values():
        for v in row.values():
            assert math.isfinite(v)
    log = [json.loads(x) for x in (run / "distill/adapter/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in log for k in ("loss", "ce", "kd", "grad_norm"))
    assert [r["step"] for r in log if "val_loss" in r] == [2, 3]  # the tiny preset: eval_every 2, and the last
    assert all(math.isfinite(r["val_loss"]) for r in log if "val_loss" in r)
