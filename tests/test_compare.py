"""`llmneo compare`: the plan (methods × grid × seeds), per-method learning rates, aggregation over
seeds, the table and plot; and (integration) a whole tiny comparison with real torchrun and lm-eval:
same data for every method, each at its own learning rate, results reused on a second call."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

import pytest

from llmneo import checkpointing
from llmneo.cards import DistillCard
from llmneo.compare import parse_grid, plan, run_compare, run_config, run_hash
from llmneo.compare_report import grid_columns, markdown, plot, summarize, table_rows
from llmneo.config import load_config
from llmneo.errors import UserError


def test_plan_runs_base_once_and_every_method_per_grid_point_and_seed():
    cfg = load_config("tiny", ["compare.methods=[base,sft,neo,base]", "compare.seeds=[0,1]"])
    runs = plan(cfg, parse_grid(["distill.lr=1e-4,5e-4"]))
    assert [(r.method, r.seed, r.point.get("distill.lr")) for r in runs] == [
        ("base", None, None),
        ("sft", 0, "1e-4"), ("sft", 1, "1e-4"), ("sft", 0, "5e-4"), ("sft", 1, "5e-4"),
        ("neo", 0, "1e-4"), ("neo", 1, "1e-4"), ("neo", 0, "5e-4"), ("neo", 1, "5e-4")]
    assert runs[1].group == "sft lr=1e-4" and runs[1].folder == "sft_lr-1e-4_seed-0"
    assert len({r.folder for r in runs}) == len(runs)


def test_each_method_gets_the_papers_learning_rate_and_nothing_else_changes():
    cfg = load_config("tiny", ["distill.lr=3e-4", "compare.lr_sft=1e-5", "compare.lr_lora=4e-4"])
    lrs = {}
    for spec in plan(cfg):
        if spec.method == "base":
            continue
        rcfg = run_config(cfg, spec)
        lrs[spec.method] = rcfg.distill.lr
        assert rcfg.distill.method == spec.method and rcfg.distill.seed == 0
        same = {k: v for k, v in rcfg.to_dict()["distill"].items() if k not in ("method", "lr", "seed")}
        assert same == {k: v for k, v in cfg.to_dict()["distill"].items() if k not in ("method", "lr", "seed")}
    assert lrs == {"sft": 1e-5, "lora": 4e-4, "kd": 2e-5, "neo": 3e-4}  # kd: the paper's default 2e-5


def test_a_grid_value_wins_over_the_methods_learning_rate():
    cfg = load_config("tiny", ["compare.methods=[sft,neo]"])
    runs = plan(cfg, parse_grid(["distill.lr=7e-4", "distill.alpha=0.9"]))
    assert [(run_config(cfg, r).distill.lr, run_config(cfg, r).distill.alpha) for r in runs] == [(7e-4, 0.9)] * 2


def test_tied_keys_move_together_and_lr_is_the_lr_column():
    cfg = load_config("tiny", ["compare.methods=[neo]"])
    grid = parse_grid(["distill.lora_rank+distill.lora_alpha=8+16,32+64", "distill.lr=1e-4,5e-4"])
    runs = plan(cfg, grid)
    got = [(c.distill.lora_rank, c.distill.lora_alpha, c.distill.lr) for c in (run_config(cfg, r) for r in runs)]
    assert got == [(8, 16.0, 1e-4), (8, 16.0, 5e-4), (32, 64.0, 1e-4), (32, 64.0, 5e-4)]  # 2 axes, not 3
    assert runs[0].folder == "neo_lora_rank-8_lora_alpha-16_lr-1e-4_seed-0"
    assert grid_columns(grid) == ["distill.lora_rank", "distill.lora_alpha"]


def test_run_hash_depends_on_what_the_run_depends_on():
    """A larger comparison (more seeds, other methods, another registry) reuses the runs it shares."""
    cfg = load_config("tiny")
    same = load_config("tiny", ["compare.seeds=[0,1,2]", "compare.methods=[neo]", "registry.uri=elsewhere"])
    assert run_hash(cfg) == run_hash(same)
    assert run_hash(cfg) != run_hash(load_config("tiny", ["distill.lr=7e-4"]))
    assert run_hash(cfg) != run_hash(load_config("tiny", ["compare.lm_eval_tasks=[]"]))
    assert run_hash(cfg, trained=False) == run_hash(load_config("tiny", ["distill.lr=7e-4"]), trained=False)


@pytest.mark.parametrize("override", ["distill.log_every=5", "distill.save_every=7", "distill.keep_checkpoint=true",
                                      "distill.nproc_per_node=1", "data.buffer_mb=8"])
def test_run_mechanics_keep_the_fingerprint_for_resume_and_reuse(override):
    """One rule for what a result depends on: a changed run mechanic (how often to log, ...) is
    resumed by the trainer and reused by compare alike; a changed alpha is neither."""
    from llmneo.trainer import training_hash

    cfg, mechanic, alpha = (load_config("tiny", o) for o in ([], [override], ["distill.alpha=0.9"]))
    assert training_hash(mechanic, "ds") == training_hash(cfg, "ds") != training_hash(alpha, "ds")
    assert run_hash(mechanic) == run_hash(cfg) != run_hash(alpha)


@pytest.mark.parametrize("items, message", [
    (["distill.lr"], "expected KEY=V1,V2"),
    (["distill.lr="], "expected KEY=V1,V2"),
    (["distill.method=sft,kd"], "set compare.methods"),
    (["distill.lora_rank+distill.seed=8+1"], "set compare.methods"),
    (["distill.lora_rank+distill.lora_alpha=8+16,32"], "value '32' needs 2 parts"),
])
def test_bad_grid_is_one_line(items, message):
    with pytest.raises(UserError, match=message):
        parse_grid(items)


def test_bad_grid_value_is_caught_before_anything_runs(tmp_path):
    cfg = load_config("tiny", ["compare.methods=[neo]"])
    with pytest.raises(UserError, match=r"distill.alpha: must be <= 1.0, got 2.0"):
        run_compare(cfg, tmp_path, parse_grid(["distill.alpha=0.5,2"]))
    assert not (tmp_path / "dataset").exists()


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmneo.cli", "compare", "--preset", "tiny", "--out", str(tmp_path),
                           "compare.methods=[neo,dpo]"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: compare.methods[1]: must be one of 'base', 'sft', 'lora', 'kd', 'neo', got 'dpo'"


def _record(method, seed, kl, acc, stderr=0.05, wall=10.0, point=None):
    group = " ".join([method, *(f"{k.split('.')[-1]}={v}" for k, v in (point or {}).items())])
    return {"method": method, "seed": seed, "point": point or {}, "group": group, "lr": 2e-4,
            "train_wall_seconds": wall, "trainable_parameters": 1_500_000,
            "metrics": {"kl_to_teacher": kl, "top1_agreement": 0.5, "perplexity": 20.0, "llmneo_mc/acc": acc},
            "stderr": {"llmneo_mc/acc": stderr}}


def test_summarize_means_and_spread_over_seeds():
    records = [_record("base", None, 3.0, 0.3, wall=None), _record("neo", 0, 2.0, 0.40, wall=10),
               _record("neo", 1, 2.5, 0.50, wall=14), _record("neo", 2, 1.5, 0.45, wall=12)]
    base, neo = summarize(records)
    assert base["mean"]["kl_to_teacher"] == 3.0 and base["spread"]["llmneo_mc/acc"] == 0.05  # one run: lm-eval stderr
    assert base["train_wall_seconds"] is None
    assert neo["seeds"] == 3 and neo["mean"]["kl_to_teacher"] == pytest.approx(2.0)
    assert neo["spread"]["kl_to_teacher"] == pytest.approx(statistics.stdev([2.0, 2.5, 1.5]))
    assert neo["mean"]["llmneo_mc/acc"] == pytest.approx(0.45) and neo["train_wall_seconds"] == pytest.approx(12)


def test_table_markdown_and_plot(tmp_path):
    from PIL import Image

    records = [_record("base", None, 3.0, 0.3, wall=None), _record("sft", 0, 2.9, 0.35),
               _record("neo", 0, 2.2, 0.31, point={"distill.lora_rank": "16"}),
               _record("neo", 0, 2.0, 0.33, point={"distill.lora_rank": "32"}),
               {**_record("teacher", None, 0.0, 0.62, wall=None), "lr": None, "trainable_parameters": None}]
    result = {"preset": "tiny", "steps": 2, "global_batch_size": 8, "nproc_per_node": 2, "seeds": [0],
              "grid": {"distill.lora_rank": ["16", "32"]}, "wall_seconds": 99.0, "rows": summarize(records)}
    headers, rows = table_rows(result)
    assert headers[:4] == ["method", "distill.lora_rank", "lr", "trained params"]
    assert rows[2][:4] == ["NEO (LoRA + KD)", "16", "0.0002", "1.50M"]
    assert rows[2][4] == "2.200" and rows[3][4] == "2.000" and rows[1][7] == "0.350 ± 0.050"
    text = markdown(result)
    assert "| SFT (full) | | 0.0002 | 1.50M | 2.900 |" in re.sub(" +", " ", text)  # tabulate pads the cells
    assert "KL to teacher: neo lora_rank=32" in text and "llmneo_mc acc: sft" in text  # best trained run per column
    png = plot(result, tmp_path / "compare.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 800 and image.size[0] > 2 * image.size[1]  # one row
    # a sweep: more rows than fit side by side → 2 × 2 panels of horizontal bars, taller than one row
    sweep = [_record("neo", 0, 2.0 + i / 10, 0.3, point={"distill.lr": f"{i}e-4"}) for i in range(1, 9)]
    png = plot({**result, "rows": summarize(sweep)}, tmp_path / "sweep.png")
    with Image.open(png) as image:
        assert image.size[1] > 0.4 * image.size[0]


# --------------------------------------------------------------------------------------------
# A whole comparison, tiny models, real torchrun and lm-eval
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cfg = load_config("tiny", ["distill.max_steps=2", "eval.max_batches=2", "compare.lm_eval_tasks=[llmneo_mc]"])
    return cfg, out, run_compare(cfg, out)


@pytest.mark.integration
def test_every_method_trains_on_the_same_batches_at_its_own_rate(tiny_compare):
    cfg, out, result = tiny_compare
    runs = {r["method"]: r for r in result["runs"]}
    assert list(runs) == ["base", "sft", "lora", "kd", "neo", "teacher"]
    logs = {}
    for method in ("sft", "lora", "kd", "neo"):
        folder = out / "runs" / f"{method}_seed-0" / "distill"
        card = DistillCard.read(folder)
        assert card.method == method and card.steps == 2
        logs[method] = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
        assert runs[method]["lr"] == {"sft": 2e-5, "lora": 2e-4, "kd": 2e-5, "neo": cfg.distill.lr}[method]
        assert logs[method][0]["lr"] == pytest.approx(runs[method]["lr"])  # warmup: 0 of 2 steps, so the peak at once
        assert runs[method]["train_wall_seconds"] > 0
    # same data, same seed: the same rows in every optimizer step
    assert len({tuple(r["target_tokens"] for r in log) for log in logs.values()}) == 1
    assert logs["sft"][0]["kd"] == 0 and logs["kd"][0]["kd"] > 0 and logs["neo"][0]["kd"] > 0
    # LoRA methods train a small branch, full methods every weight
    assert runs["lora"]["trainable_parameters"] == runs["neo"]["trainable_parameters"] < runs["sft"]["trainable_parameters"]
    teacher = runs["teacher"]["metrics"]
    assert teacher["kl_to_teacher"] == 0 and teacher["top1_agreement"] == 1
    for r in result["runs"]:
        assert 0 <= r["metrics"]["llmneo_mc/acc"] <= 1 and r["metrics"]["kl_to_teacher"] >= 0


@pytest.mark.integration
def test_outputs_agree_with_the_runs(tiny_compare):
    _, out, result = tiny_compare
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    for row in saved["rows"]:
        (record,) = [r for r in saved["runs"] if r["group"] == row["group"]]
        assert row["mean"] == {k: v for k, v in record["metrics"].items() if k in row["mean"]}
        per_run = json.loads((out / "runs" / ("teacher" if row["method"] == "teacher" else
                                              "base" if row["method"] == "base" else
                                              f"{row['method']}_seed-0") / "eval.json").read_text())
        assert per_run["metrics"] == record["metrics"]
    md = (out / "compare.md").read_text()
    assert f"{saved['rows'][4]['mean']['kl_to_teacher']:.3f}" in md and "NEO (LoRA + KD)" in md
    assert (out / "compare.png").stat().st_size > 10_000


@pytest.mark.integration
def test_second_call_reuses_data_teacher_and_every_run(tiny_compare, capsys):
    cfg, out, first = tiny_compare
    stamps = {p: p.stat().st_mtime_ns for p in [out / "dataset" / "train.parquet", out / "student" / "card.json",
                                                *(out / "runs").glob("*/distill/card.json")]}
    second = run_compare(cfg, out)
    assert "reusing" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing prepared or trained again
    assert second["runs"] == first["runs"]


@pytest.mark.integration
def test_a_changed_configuration_trains_again(tiny_compare, capsys):
    """An edited preset (here NEO's learning rate): the NEO run is trained and evaluated again in its
    folder, its old checkpoint state discarded; the other methods are reused."""
    cfg, out, first = tiny_compare
    changed = load_config("tiny", ["distill.max_steps=2", "eval.max_batches=2", "compare.lm_eval_tasks=[llmneo_mc]",
                                   "compare.methods=[sft,neo]", "distill.lr=3e-3"])
    folder = out / "runs" / "neo_seed-0"
    # as if the old configuration's run had been interrupted: a checkpoint the trainer would refuse
    ckpt = folder / "distill" / "checkpoint"
    (ckpt / "step-000001").mkdir(parents=True)
    (ckpt / "step-000001" / checkpointing.TRAINER_STATE).write_text(json.dumps({"config_hash": "0" * 16}))
    (ckpt / checkpointing.LATEST).write_text("step-000001")
    second = run_compare(changed, out)
    log = capsys.readouterr().out
    assert "neo_seed-0: configuration changed, training again" in log and "sft_seed-0: reusing" in log
    runs = {r["method"]: r for r in second["runs"]}
    assert runs["neo"]["lr"] == 3e-3 and runs["sft"] == {r["method"]: r for r in first["runs"]}["sft"]
    steps = [json.loads(x) for x in (folder / "distill" / "train_log.jsonl").read_text().splitlines()]
    assert steps[0]["lr"] == pytest.approx(3e-3) and not ckpt.exists()


def test_a_grid_over_epochs_replaces_the_presets_max_steps():
    cfg = load_config("tiny")
    (spec,) = [s for s in plan(cfg, parse_grid(["distill.epochs=2"])) if s.method == "neo"]
    d = run_config(cfg, spec).distill
    assert (d.max_steps, d.epochs) == (0, 2.0)
