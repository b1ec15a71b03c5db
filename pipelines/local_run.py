"""Run the whole DAG on this machine through ``kfp.local`` (SubprocessRunner, current interpreter).

    llmneo run --preset tiny [key=value ...]

kfp.local runs the same compiled components as a cluster (If and retries included; it ignores
kfp-kubernetes and resource settings, and its task cache is left off, so every step runs). Artifacts
land under ``--pipeline-root``; at the end a summary table names each step's time and key metrics,
and where the registered model is.

Output (:mod:`llmneo_pipelines.local_console`): a line when each step starts and ends, its progress
bar, then the summary; each step's full output is in ``<run folder>/logs/<task>.log``.
``--verbose`` streams all of it instead.
"""

import json
import sys
import time
from pathlib import Path

from llmneo.cards import AnswersCard, DatasetCard, DistillCard, EvalCard, ModelCard, ModelCards
from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.preflight import hub_access, preflight
from llmneo.registry import MANIFEST
from llmneo.report import table
from llmneo.steps import STEPS as PIPELINE_STEPS
from llmneo.storage import open_store
from llmneo_pipelines import local_console

STEPS = [(step.task, step.label) for step in PIPELINE_STEPS]  # (KFP task name, summary label)


def executor_outputs(run_dir: Path, task: str) -> tuple[dict, dict]:
    """(output parameters, {artifact name: (uri, metadata)}) of one finished task, or empty dicts."""
    path = run_dir / task / "executor_output.json"
    if not path.is_file():
        return {}, {}
    out = json.loads(path.read_text())
    artifacts = {name: (a["artifacts"][0]["uri"], a["artifacts"][0].get("metadata", {}))
                 for name, a in out.get("artifacts", {}).items() if a.get("artifacts")}
    return out.get("parameterValues", {}), artifacts


def _card(artifact: tuple[str, dict] | None, read):
    """The card in a task's output folder, or None when the step did not complete."""
    if not artifact:
        return None
    try:
        return read(artifact[0])
    except UserError:
        return None


# The card of each step's output (the register step has none: its result is the output parameter)
CARD_OF = {"generate-answers": ("answers", AnswersCard.read), "prep-data": ("dataset", DatasetCard.read), "distill": ("adapter", DistillCard.read),
           "merge-eval": ("model", EvalCard.read)}


def step_card(run_dir: Path, task: str, outs: tuple[dict, dict] | None = None):
    """The card of a finished step of the first four (the teacher step's pair of cards), or None."""
    _, artifacts = outs if outs is not None else executor_outputs(run_dir, task)
    if task == "load-teacher":
        teacher, student = (_card(artifacts.get(role), ModelCard.read) for role in ("teacher", "student"))
        return ModelCards(teacher, student) if teacher and student else None
    if task not in CARD_OF:
        return None
    name, read = CARD_OF[task]
    return _card(artifacts.get(name), read)


def step_result(run_dir: Path, task: str) -> str:
    """A finished step's key result in one line (its card's summary line; register: what it registered)."""
    if task == "register":
        registered = executor_outputs(run_dir, task)[0].get("Output")
        return f"registered {registered.split('@', 1)[0]}" if registered else ""
    card = step_card(run_dir, task)
    return card.summary_line() if card else ""


def summarize(run_dir: Path, wall: float) -> tuple[str, dict]:
    """The end-of-run summary table (and the facts it shows) from the outputs of one run: each step's
    line comes from its card (:mod:`llmneo.cards`, the same metrics its component logged)."""
    outs = {task: executor_outputs(run_dir, task) for task, _ in STEPS}

    def artifact(task: str, name: str):
        return outs[task][1].get(name)

    done = {task: step_card(run_dir, task, outs[task]) for task, _ in STEPS[:-1]}
    registered = outs["register"][0].get("Output")
    model_uri = (artifact("merge-eval", "model") or (None, {}))[0]
    evaluation = {}
    if done["merge-eval"] and (Path(model_uri) / "eval.json").is_file():
        evaluation = json.loads((Path(model_uri) / "eval.json").read_text())
    register_seconds = outs["register"][1].get("metrics", ("", {}))[1].get("seconds", "-")
    rows = [[label, card.step_metrics()["seconds"], card.summary_line()] if card else
            [label, "-", "did not run"] for (task, label), card in zip(STEPS[:-1], done.values(), strict=True)]
    rows.append([STEPS[-1][1], register_seconds if registered else "-", registered or "skipped (gate failed)"])
    text = table(["step", "work s", "result"], rows, align_right=False)
    # two measures, named: the progress lines time whole tasks, the cards time the step's own work
    text += ("\nwork s: the step's own work (its card); the 'done in' times above are whole tasks, with "
             "starting Python and loading libraries")
    text += f"\n\ntotal wall time {wall:.1f} s"
    if model_uri:
        text += f"\nreport:           {Path(model_uri) / 'report.md'}"
    run_id = registered_run_id(registered)
    text += f"\nrun folder:       {run_dir}"
    if run_id:
        text += f"\nrun id:           {run_id} (the registry lineage's pipeline_run_id)"
    if registered:
        text += f"\nregistered model: {registered.split('@', 1)[1]}"
    return text, {"registered": registered, "eval": evaluation, "model_dir": model_uri, "run_id": run_id}


def registered_run_id(registered: str | None) -> str | None:
    """The run id kfp.local gave the run, as the registered version's lineage records it (kfp.local
    names the run folder after the time, not after this id)."""
    if not registered or "@" not in registered:
        return None
    try:
        data = open_store(registered.split("@", 1)[1]).get_bytes(MANIFEST)
        return json.loads(data)["lineage"]["pipeline_run_id"] if data else None
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None


def step_console(cfg, interval: float = 30.0) -> local_console.StepConsole:
    """The quiet console of a local run: steps labelled ``[3/5] NEO distill``; the distill step's start
    line says what its length amounts to (``distill.max_steps``/``epochs``, from the prepared rows)."""
    number = {task: i for i, (task, _) in enumerate(STEPS, 1)}
    width = max(len(label) for _, label in STEPS)

    def label(task: str) -> str:
        name = dict(STEPS).get(task, task)
        return f"[{number.get(task, '?')}/{len(STEPS)}] {name:<{width}}"

    def started(task: str) -> str:
        if task != "distill" or console.logs_dir is None:
            return ""
        dataset = step_card(console.logs_dir.parent, "prep-data")
        if dataset is None:
            return ""
        rows = (dataset.packing or {}).get("train_rows", dataset.counts.get("train"))
        return cfg.distill.length_line(rows) if rows else ""

    console = local_console.StepConsole(sys.stdout, label, started, step_result, interval=interval)
    return console


def pin_registry(cfg, overrides: list[str]) -> list[str]:
    """``overrides`` + the registry this command resolved (the override, else $LLMNEO_REGISTRY, else
    the preset's): components run in their own processes and read the preset again; a local
    registry is pinned to this directory."""
    registry = cfg.registry.uri
    is_local = "://" not in registry or registry.startswith("file://")
    return [*overrides, f"registry.uri={Path(registry.removeprefix('file://')).resolve() if is_local else registry}"]


def run_local(preset: str, overrides: list[str], pipeline_root: str = "runs/kfp", runner: str = "subprocess",
              verbose: bool = False) -> int:
    from kfp import local

    from llmneo_pipelines import local_oneof
    from llmneo_pipelines.llm_neo import llm_neo

    local_oneof.install()

    cfg = load_config(preset, overrides)  # validate before anything runs
    preflight(cfg)  # every input exists and is readable: a missing file fails now, not after retries
    hub_access(cfg)  # offline when every input is local or packaged; else the hub must answer
    overrides = pin_registry(cfg, overrides)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if runner == "containers":  # every step in the project's images; only the pipeline root is shared
        from llmneo_components.images import CPU_IMAGE, IMAGE
        from llmneo_pipelines import container_run

        container_run.check_config(cfg)
        container_run.ensure_engine()
        container_run.check_images([IMAGE, CPU_IMAGE])
        container_run.install(root)
        local.init(runner=local.DockerRunner(), pipeline_root=str(root), raise_on_error=True)
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    before = {p.name for p in root.iterdir()} | {".cache"}
    t0 = time.time()
    output = local_console.streamed() if verbose else local_console.routed(step_console(cfg))
    try:
        with output:
            # distill_gpus="0": torchrun processes from the preset (no GPUs here); kfp.local ignores the rest
            llm_neo(preset=preset, overrides=overrides, max_kl_to_teacher=cfg.eval.max_kl_to_teacher,
                    distill_gpus="0", eval_gpus="0", distill_nodes=cfg.distill.nnodes)
    except RuntimeError as e:
        print(f"error: pipeline failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    wall = time.time() - t0
    new = sorted((p for p in root.iterdir() if p.name not in before), key=lambda p: p.stat().st_mtime)
    if not new:
        print("error: kfp.local produced no run folder", file=sys.stderr)
        return 1
    text, _ = summarize(new[-1], wall)
    if not verbose:
        text += f"\nstep logs:        {local_console.shown_path(new[-1] / 'logs')}"
    print("\n" + text)
    return 0
