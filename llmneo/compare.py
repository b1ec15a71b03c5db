"""The LLM-NEO paper's comparison in miniature: the student untouched, SFT, LoRA, KD and NEO on the same data,
steps and seeds, evaluated against the teacher — a table (Markdown) and a plot (PNG).

    llmneo compare --preset smollm2-demo                               # = make compare
    llmneo compare --preset smollm2-demo 'compare.methods=[lora,neo]' \\
        --grid distill.lr=1e-4,2e-4,5e-4 --grid distill.lora_rank=8,32  # a sweep (cartesian product)

Data prep and teacher loading run once (``llmneo.steps.prepare_dataset`` / ``load_teacher``); each method is
the distill step (``llmneo.steps.distill_student``, torchrun) with ``distill.method=<method>``, its
learning rate (``compare.lr_sft`` / ``lr_lora`` / ``lr_kd``; NEO's is ``distill.lr``, the preset's own
run), ``distill.seed=<seed>`` and the grid point, then merged (``llmneo.evaluate.merge``, fp32) and
evaluated (``llmneo.evaluate.evaluate_models``: KL(teacher‖model), top-1 agreement and perplexity on
the val split, plus ``compare.lm_eval_tasks``). Every run keeps its own folder with ``eval.json``, so
an interrupted comparison continues where it stopped (finished runs are not trained or evaluated
again).

Outputs in ``--out``: ``compare.json`` (every run, every number, wall times), ``compare.md`` (the table)
and ``compare.png`` (the plot); the table and the plot are made by :mod:`llmneo.compare_report`.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmneo import cards
from llmneo.cards import DatasetCard, DistillCard
from llmneo.compare_report import markdown, plot, summarize
from llmneo.config import FINGERPRINT_SECTIONS, Config, apply_overrides, config_from_dict, resolve_config
from llmneo.errors import UserError
from llmneo.steps import distill_student, load_teacher, prepare_dataset

# --------------------------------------------------------------------------------------------
# The plan: which runs
# --------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One trained (or untouched) student: a method, a seed and a grid point (key → value text)."""

    method: str
    seed: int | None = None
    point: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """The row of the table: method + grid point (seeds are aggregated)."""
        return " ".join([self.method, *(f"{k.split('.')[-1]}={v}" for k, v in self.point.items())])

    @property
    def folder(self) -> str:
        name = self.group.replace(" ", "_").replace("=", "-")
        return name if self.seed is None else f"{name}_seed-{self.seed}"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["distill.lr=1e-4,2e-4", "distill.alpha=0.5,0.9"]`` → {key: [value texts]} (scalars only).

    Keys joined with ``+`` move together (one axis, not a product):
    ``distill.lora_rank+distill.lora_alpha=16+32,64+128`` keeps lora_alpha = 2×rank."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. distill.lr=1e-4,2e-4")
        keys = [k.strip() for k in key.split("+")]
        for k in keys:
            if k in ("distill.method", "distill.seed"):
                raise UserError(f"--grid {k}: set compare.methods / compare.seeds instead")
            if not k:
                raise UserError(f"--grid {item!r}: empty key in {key!r}")
        for choice in choices:
            if len(choice.split("+")) != len(keys):
                raise UserError(f"--grid {item!r}: value {choice!r} needs {len(keys)} parts joined by '+' "
                                f"(one per key of {key!r})")
        grid[key] = choices
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product of the grid's axes, each point as {config key: value text}."""
    points = []
    for combo in itertools.product(*grid.values()):
        point: dict[str, str] = {}
        for key, value in zip(grid, combo, strict=True):
            point.update(zip(key.split("+"), value.split("+"), strict=True))
        points.append(point)
    return points


def plan(cfg: Config, grid: dict[str, list[str]] | None = None) -> list[RunSpec]:
    """``compare.methods`` × grid points × ``compare.seeds``; the untouched student once."""
    points = grid_points(grid or {})
    runs = []
    for method in dict.fromkeys(cfg.compare.methods):  # de-duplicated, in the given order
        if method == "base":
            runs.append(RunSpec("base"))
            continue
        runs += [RunSpec(method, seed, point) for point in points for seed in dict.fromkeys(cfg.compare.seeds)]
    return runs


def method_lr(cfg: Config, method: str) -> float:
    """The paper's per-method learning rates: full-parameter sft/kd vs LoRA branch (lora, neo)."""
    return cfg.distill.lr if method == "neo" else getattr(cfg.compare, f"lr_{method}")


def run_config(cfg: Config, spec: RunSpec) -> Config:
    """The configuration of one run: the preset's, with method, lr, seed and the grid point applied.

    A grid value of ``distill.lr`` replaces the method's own learning rate."""
    overrides = [f"distill.method={spec.method}", f"distill.lr={method_lr(cfg, spec.method)!r}",
                 f"distill.seed={spec.seed}", *(f"{k}={v}" for k, v in spec.point.items())]
    return resolve_config(cfg.to_dict(), overrides)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _inputs_key(cfg: Config) -> dict:
    """What the shared dataset/teacher/student folders depend on."""
    return {"fingerprint": cfg.fingerprint(("data", "teacher", "student"))}


def _train_rows(card: DatasetCard) -> int:
    """Rows the trainer sees in the train split (packed rows when packing)."""
    return (card.packing or {}).get("train_rows", card.counts.get("train", 0))


def prepare(cfg: Config, out: Path) -> tuple[Path, Path, Path]:
    """Data prep and teacher loading, once: reused while the data/teacher/student config is unchanged."""

    dataset, teacher, student = out / "dataset", out / "teacher", out / "student"
    stamp = out / "inputs.json"
    key = _inputs_key(cfg)
    done = all(cards.exists(p) for p in (dataset, teacher, student))
    if done and stamp.is_file() and json.loads(stamp.read_text()) == key:
        print(f"compare: reusing {dataset}, {teacher}, {student}", flush=True)
        return dataset, teacher, student
    stamp.unlink(missing_ok=True)
    prepare_dataset(cfg, dataset)
    load_teacher(cfg, dataset, teacher, student)
    stamp.write_text(json.dumps(key, indent=2))
    return dataset, teacher, student


def _eval_cfg(cfg: Config) -> Config:
    return config_from_dict(apply_overrides(cfg.to_dict(), [
        f"eval.lm_eval_tasks={json.dumps(cfg.compare.lm_eval_tasks)}"]))


def evaluate_run(cfg: Config, name: str, model_spec, dataset: Path, teacher: Path) -> dict:
    """Fidelity + ``compare.lm_eval_tasks`` of one model (``model_spec=None``: the teacher itself);
    returns its flat metrics and the lm-eval standard errors."""
    from llmneo.evaluate import evaluate_models

    models = {} if model_spec is None else {name: model_spec}
    result = evaluate_models(models, teacher, dataset, _eval_cfg(cfg), lm_eval_on=[name])
    scores = result["lm_eval"].get(name, {})
    stderr = {f"{task}/{m.removesuffix('_stderr')}": v for task, metrics in scores.items()
              for m, v in metrics.items() if m.endswith("_stderr")}
    return {"metrics": result["summary"][name], "stderr": stderr, "eval_seconds": result["seconds"]}


def run_hash(cfg: Config, trained: bool = True) -> str:
    """What one run's numbers depend on (:meth:`Config.fingerprint`): data, teacher, student, distill
    (if trained) and eval settings — not the registry, not the rest of the comparison (its seeds,
    methods or grid), so a larger comparison reuses the runs it shares with a smaller one; not run
    mechanics either (a changed ``distill.log_every`` reuses the run, as the trainer resumes it)."""
    sections = (*FINGERPRINT_SECTIONS, "eval") if trained else ("data", "teacher", "student", "eval")
    return cfg.fingerprint(sections, extra={"lm_eval_tasks": cfg.compare.lm_eval_tasks})


def run_one(cfg: Config, spec: RunSpec, dataset: Path, teacher: Path, student: Path, out: Path) -> dict:
    """Train (unless ``base``), merge in fp32, evaluate; ``<out>/runs/<folder>/eval.json``. Reused when
    it exists for the same run configuration and dataset."""
    from llmneo.evaluate import merge

    rcfg = run_config(cfg, spec) if spec.method != "base" else cfg
    folder = out / "runs" / spec.folder
    record_path = folder / "eval.json"
    dataset_hash = DatasetCard.read(dataset).dataset_hash
    key = {"run_hash": run_hash(rcfg, trained=spec.method != "base"), "dataset_hash": dataset_hash}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in key} == key:
            print(f"compare: {spec.folder}: reusing {record_path}", flush=True)
            return record
    folder.mkdir(parents=True, exist_ok=True)
    train: dict = {}
    if spec.method == "base":
        model_spec = student
    else:
        distill_dir = folder / "distill"
        stamp = folder / "run_hash.txt"
        if stamp.is_file() and stamp.read_text().strip() != key["run_hash"]:
            # the run's configuration changed (e.g. an edited preset): a checkpoint of the old one
            # must not be resumed (the trainer would refuse it), so this run starts over
            print(f"compare: {spec.folder}: configuration changed, training again", flush=True)
            shutil.rmtree(distill_dir, ignore_errors=True)
            record_path.unlink(missing_ok=True)
        stamp.write_text(key["run_hash"] + "\n")
        before = DistillCard.read(distill_dir) if cards.exists(distill_dir) else None
        # the comparison owns its run folders and decides itself when a run is trained again
        card = distill_student(rcfg, dataset, teacher, student, distill_dir, overwrite=True)
        wall = card.wall_seconds
        if before is not None and before.complete_for(card.config_hash) and before.wall_seconds is not None:
            wall = before.wall_seconds  # not trained again: keep the training's wall time
        train = {"train_wall_seconds": wall, "train_step_seconds": card.seconds,
                 "trainable_parameters": card.trainable_parameters, "final": card.final,
                 "tokens_per_s": card.tokens_per_s}
        merged_dir = folder / "merged"
        # fp32: the weights as trained (a bf16 save would round away part of a 2e-5 full-parameter update)
        model_spec = merge(student, distill_dir, merged_dir, dtype="float32")
        shutil.rmtree(merged_dir, ignore_errors=True)  # evaluated in memory; the run folder keeps distill/
    evaluation = evaluate_run(rcfg, spec.method, model_spec, dataset, teacher)
    record = {"method": spec.method, "seed": spec.seed, "point": spec.point, "group": spec.group,
              "lr": rcfg.distill.lr if spec.method != "base" else None, **train, **evaluation, **key}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def evaluate_teacher(cfg: Config, dataset: Path, teacher: Path, out: Path) -> dict:
    """The teacher's own perplexity and lm-eval scores (once: they do not depend on any run)."""

    path = out / "runs" / "teacher" / "eval.json"
    key = {"dataset_hash": DatasetCard.read(dataset).dataset_hash, "tasks": cfg.compare.lm_eval_tasks,
           "teacher": cfg.fingerprint(("teacher",))}
    if path.is_file() and {k: json.loads(path.read_text()).get(k) for k in key} == key:
        return json.loads(path.read_text())
    print("\n=== compare: the teacher's own scores ===", flush=True)
    record = {"method": "teacher", "seed": None, "point": {}, "group": "teacher",
              **evaluate_run(cfg, "teacher", None, dataset, teacher), **key}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_compare(cfg: Config, out: str | Path, grid: dict[str, list[str]] | None = None) -> dict:
    """The whole comparison; returns ``compare.json``'s content (also written, with the table and plot)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(cfg, grid)
    for spec in runs:  # every run's configuration is checked before anything trains
        if spec.method != "base":
            run_config(cfg, spec)
    t0 = time.time()
    dataset, teacher, student = prepare(cfg, out)
    records = []
    for i, spec in enumerate(runs, 1):
        print(f"\n=== compare [{i}/{len(runs)}] {spec.folder} ===", flush=True)
        records.append(run_one(cfg, spec, dataset, teacher, student, out))
    records.append(evaluate_teacher(cfg, dataset, teacher, out))
    result = {"preset": cfg.name, "config_hash": cfg.hash(), "grid": grid or {}, "seeds": cfg.compare.seeds,
              "steps": cfg.distill.total_steps(_train_rows(DatasetCard.read(dataset))), "global_batch_size": cfg.distill.global_batch_size,
              "nproc_per_node": cfg.distill.nproc_per_node, "runs": records,
              "rows": summarize(records), "wall_seconds": round(time.time() - t0, 1)}
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(result))
    plot(result, out / "compare.png")
    return result
