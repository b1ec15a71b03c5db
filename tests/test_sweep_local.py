"""The sweep DAG end to end through kfp.local: a 2×2 tiny grid, real torchrun (gloo)."""

import json
import subprocess
import sys

import pytest

from llmneo.cards import EvalCard
from llmneo.sweep import POINT_FILE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run(
        [sys.executable, "-m", "llmneo_pipelines.cli", "sweep", "--preset", "tiny", "--pipeline-root", str(root / "kfp"),
         "--grid", "distill.alpha=0.5,0.9", "--grid", "distill.lora_rank=4,8", "distill.max_steps=1",
         "distill.eval_every=0", "distill.nproc_per_node=1", "eval.lm_eval_tasks=[]", f"registry.uri={root / 'registry'}"],
        capture_output=True, text=True, cwd=root, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list((root / "kfp").iterdir())
    return root, run_dir, proc.stdout


def test_teacher_once_every_point_trained_and_evaluated(sweep_run):
    _, run, _ = sweep_run
    assert len(list(run.rglob("load-teacher/executor_output.json"))) == 1
    assert len(list(run.rglob("prep-data/executor_output.json"))) == 1
    assert len(list(run.rglob("distill/executor_output.json"))) == 4
    points = [json.loads(p.read_text()) for p in run.rglob(f"merge-eval/model/{POINT_FILE}")]
    assert sorted(tuple(p["overrides"][-2:]) for p in points) == [
        ("distill.alpha=0.5", "distill.lora_rank=4"), ("distill.alpha=0.5", "distill.lora_rank=8"),
        ("distill.alpha=0.9", "distill.lora_rank=4"), ("distill.alpha=0.9", "distill.lora_rank=8")]
    assert all(p["status"] == "ok" for p in points)


def test_winner_is_the_best_card_and_only_it_is_registered(sweep_run):
    root, run, out = sweep_run
    cards = {}
    for folder in run.rglob("merge-eval/model"):
        point = json.loads((folder / POINT_FILE).read_text())
        cards[tuple(point["overrides"][-2:])] = EvalCard.read(folder).metrics
    best = min(cards, key=lambda k: (cards[k]["kl_to_teacher"], -cards[k]["top1_agreement"], cards[k]["perplexity"]))
    manifests = list((root / "registry").glob("tiny-neo/v*/manifest.json"))
    assert len(manifests) == 1  # only the winner
    lineage = json.loads(manifests[0].read_text())["lineage"]
    sweep = lineage["sweep"]
    assert len(sweep["points"]) == 4 and sweep["metric"] == "kl_to_teacher"
    winner = sweep["points"][sweep["winner"]]
    assert tuple(winner["overrides"]) == best and winner["winner"]
    assert winner["metrics"]["kl_to_teacher"] == cards[best]["kl_to_teacher"]
    for row in sweep["points"]:  # the table's numbers are the points' own cards
        assert row["metrics"] == cards[tuple(row["overrides"])]
    assert lineage["config"]["distill"]["alpha"] == float(best[0].split("=")[1])
    assert lineage["config"]["distill"]["lora_rank"] == int(best[1].split("=")[1])
    assert "★ winner" in out and "registered model:" in out


def test_report_artifacts(sweep_run):
    _, run, _ = sweep_run
    md = (run / "select-sweep" / "report").read_text()
    assert md.count("★ winner") == 1 and md.count("| ok ") == 4
    assert "data:image/png;base64," in (run / "select-sweep" / "report_html").read_text()
