"""The real-model path at reduced size: `make run`'s preset smollm2-demo through the whole DAG (kfp.local,
torchrun × 2, lm-eval, local registry) with the real SmolLM2-135M-Instruct teacher and its pruned
student, a few NEO steps. The distilled student must be closer to the teacher than the pruned student
it started from — checked on the registered weights themselves, not only in the step's report.

In CI the SmolLM2 cache (~/.cache/llmneo) is cold: the GGUF → bf16 conversion adds ~30 s."""

from __future__ import annotations

import json
import math

import pytest

from conftest import llmneo_run
from llmneo.cards import DatasetCard, ModelCard
from llmneo.config import load_config

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_dir, out = llmneo_run(root, "smollm2-demo", f"distill.max_steps={STEPS}", "eval.lm_eval_tasks=[llmneo_mc]",
                              "eval.lm_eval_models=[distilled]", timeout=900)
    return root, run_dir, out


def test_student_is_the_pruned_teacher_and_data_is_the_shipped_set(demo_run):
    _, run, _ = demo_run
    cfg = load_config("smollm2-demo")
    student = ModelCard.read(run / "load-teacher/student")
    teacher = ModelCard.read(run / "load-teacher/teacher")
    assert teacher.layers == 30 and student.layers == len(cfg.student.prune_layers) == 20
    assert student.kept_layers == cfg.student.prune_layers and student.pruned_from == "smollm2"
    assert student.tokenizer_fingerprint == teacher.tokenizer_fingerprint
    dataset = DatasetCard.read(run / "prep-data/dataset")
    assert dataset.source == "builtin:smollm2_instruct"
    assert dataset.counts["train"] + dataset.counts["val"] == 276


def test_distilled_student_is_closer_to_the_teacher(demo_run):
    _, run, _ = demo_run
    result = json.loads((run / "merge-eval/model/eval.json").read_text())
    base, distilled = result["fidelity"]["base_student"], result["fidelity"]["distilled"]
    print(f"KL to teacher on val: pruned {base['kl_to_teacher']:.4f} → distilled ({STEPS} steps) "
          f"{distilled['kl_to_teacher']:.4f}")
    assert distilled["kl_to_teacher"] < 0.8 * base["kl_to_teacher"], (base, distilled)  # measured 3.13 → 1.60
    assert distilled["perplexity"] < base["perplexity"]
    assert result["gate"]["passed"] and 0 <= result["metrics"]["llmneo_mc/acc"] <= 1
    log = [json.loads(x) for x in (run / "distill/adapter/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in log)


def test_registered_weights_are_what_was_measured(demo_run):
    """Recompute KL(teacher‖model) on the val split from the registry copy and the pruned student folder."""
    import torch

    from llmneo.data import read_split
    from llmneo.evaluate import fidelity
    from llmneo.models import load_causal_lm, load_tokenizer
    from llmneo.registry import open_registry, verify

    root, run, out = demo_run
    cfg = load_config("smollm2-demo", [f"registry.uri={root / 'registry'}"])
    registry = open_registry(cfg.registry)
    (version,) = registry.versions(cfg.registry.name)
    manifest = registry.show(f"{cfg.registry.name}:{version}")
    folder = root / "registry" / cfg.registry.name / version
    verify(folder, manifest)
    assert f"registered model: {folder}" in out and "report:" in out

    teacher = load_causal_lm(run / "load-teacher/teacher", dtype=torch.float32).eval()
    models = {"registered": load_causal_lm(folder, dtype=torch.float32).eval(),
              "pruned": load_causal_lm(run / "load-teacher/student", dtype=torch.float32).eval()}
    rows = read_split(run / "prep-data/dataset", "val")
    ours = fidelity(models, teacher, rows, load_tokenizer(folder).pad_token_id, batch_size=8)
    measured = json.loads((run / "merge-eval/model/eval.json").read_text())["fidelity"]
    assert ours["registered"]["kl_to_teacher"] == pytest.approx(measured["distilled"]["kl_to_teacher"], rel=1e-4)
    assert ours["pruned"]["kl_to_teacher"] == pytest.approx(measured["base_student"]["kl_to_teacher"], rel=1e-4)
    assert ours["registered"]["kl_to_teacher"] < ours["pruned"]["kl_to_teacher"]
    assert manifest["metrics"]["kl_to_teacher"] == measured["distilled"]["kl_to_teacher"]
