"""GitOps for recurring runs: ``k8s/schedules/*.yaml`` (in Git) → KFP recurring runs.

    llmneo schedule sync --host URL --dir k8s/schedules --pool-file k8s/overlays/gke-a100/pool.yaml --dry-run
    llmneo schedule sync --host URL --dir k8s/schedules --pool-file k8s/overlays/gke-a100/pool.yaml

One file per schedule::

    name: nightly-smollm2-demo      # [a-z0-9-], unique
    cron: "0 2 * * *"               # 5 fields (or KFP's 6, seconds first), UTC
    preset: smollm2-demo
    overrides: [distill.max_steps=12]
    pipeline_version: "0.1.0"       # uploaded version name; "latest" or absent: the newest
    grid: ["distill.alpha=0.5,0.9"] # optional: a sweep (pipeline llm-neo-sweep, uploaded with --sweep)
    parameters: {distill_gpus: 1}   # pipeline parameters over the pool file's
    enabled: true                   # false: kept, but paused
    max_concurrency: 1

The reconciler owns the recurring runs whose description starts with ``MARKER`` and leaves every
other one alone. Each owned run carries a fingerprint of its desired state (cron, version,
parameters, enabled, ...). A sync then: creates what is missing; keeps what matches (so a second
sync does nothing); replaces what changed — KFP cannot update a recurring run, so the new one is
created first and the old one paused, then deleted (never a window without the schedule); and
pauses + deletes owned runs whose file is gone. ``--dry-run`` prints the plan and changes nothing.
Every file is validated (fields, cron, configuration, parameters) before any call to KFP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmneo.errors import UserError
from llmneo.report import table
from llmneo_pipelines import kfp_client
from llmneo_pipelines.kfp_client import (
    DEFAULT_EXPERIMENT,
    DEFAULT_SERVICE_ACCOUNT,
    _api_errors,
    all_pages,
    check_server,
    check_version_images,
    read_pool,
    resolve_version,
    run_parameters,
)

MARKER = "[llmneo-schedule]"
KEYS = {"name", "cron", "preset", "overrides", "pipeline_version", "parameters", "enabled", "max_concurrency",
        "description", "grid"}
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-?]+$")


@dataclass
class Schedule:
    name: str
    cron: str  # KFP's 6-field form
    preset: str
    overrides: list[str]
    pipeline_version: str | None
    parameters: dict[str, Any]
    enabled: bool = True
    max_concurrency: int = 1
    description: str = ""
    source: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    pipeline: str = kfp_client.PIPELINE_NAME  # llm-neo, or llm-neo-sweep with a grid


def kfp_cron(cron: str, where: str) -> str:
    """5-field cron (minute first) → KFP's 6-field form (seconds first); 6 fields pass through."""
    fields = str(cron).split()
    if len(fields) not in (5, 6) or not all(CRON_FIELD.match(f) for f in fields):
        raise UserError(f"{where}: cron: expected 5 fields like '0 2 * * *', got {cron!r}")
    return " ".join(["0", *fields] if len(fields) == 5 else fields)


def load_schedule(path: Path, pool: dict) -> Schedule:
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: a schedule is a mapping (name, cron, preset, ...)")
    unknown = set(data) - KEYS
    if unknown:
        raise UserError(f"{where}: {sorted(unknown)[0]}: unknown key; known: {', '.join(sorted(KEYS))}")
    for key in ("name", "cron", "preset"):
        if not data.get(key):
            raise UserError(f"{where}: {key}: required")
    if not NAME.match(str(data["name"])):
        raise UserError(f"{where}: name: lowercase letters, digits and '-', got {data['name']!r}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{where}: overrides: a list of key=value strings")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise UserError(f"{where}: parameters: a mapping of pipeline parameters")
    enabled, concurrency = data.get("enabled", True), data.get("max_concurrency", 1)
    if not isinstance(enabled, bool):
        raise UserError(f"{where}: enabled: true or false, got {enabled!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise UserError(f"{where}: max_concurrency: a positive integer, got {concurrency!r}")
    grid = data.get("grid")
    if grid is not None:  # a sweep: the grid is a parameter of the sweep pipeline, checked point by point
        if not isinstance(grid, list) or not grid or not all(isinstance(g, str) for g in grid):
            raise UserError(f"{where}: grid: a list of KEY=V1,V2 strings, each quoted in a [...] list")
        from llmneo.config import load_config
        from llmneo.sweep import plan_points

        try:
            plan_points(overrides, grid, lambda point: load_config(str(data["preset"]), point))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        params = {**params, "grid": grid}
    version = data.get("pipeline_version")
    sched = Schedule(name=data["name"], cron=kfp_cron(data["cron"], where), preset=str(data["preset"]),
                     overrides=overrides, pipeline_version=str(version) if version is not None else None,
                     parameters=params, enabled=enabled, max_concurrency=concurrency,
                     description=str(data.get("description") or ""), source=where)
    if grid is not None:
        sched.pipeline = kfp_client.SWEEP_PIPELINE
    sched.arguments = run_parameters(sched.preset, overrides, pool, params, where=where,
                                     package=kfp_client._packaged_sweep() if grid is not None else None)
    return sched


def load_schedules(directory: str | Path, pool: dict) -> list[Schedule]:
    """Every ``*.yaml`` in ``directory`` (kustomization.yaml excepted), validated; names unique."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--dir: {directory} is not a folder")
    paths = sorted(p for p in [*directory.glob("*.yaml"), *directory.glob("*.yml")] if p.name != "kustomization.yaml")
    schedules = [load_schedule(p, pool) for p in paths]
    seen: dict[str, str] = {}
    for s in schedules:
        if s.name in seen:
            raise UserError(f"{s.source}: name: {s.name!r} is also used by {seen[s.name]}")
        seen[s.name] = s.source
    return schedules


# --------------------------------------------------------------------------------------------
# Plan and apply
# --------------------------------------------------------------------------------------------


def fingerprint(s: Schedule, version_id: str, service_account: str | None) -> str:
    state = {"cron": s.cron, "version_id": version_id, "arguments": s.arguments, "enabled": s.enabled,
             "max_concurrency": s.max_concurrency, "service_account": service_account or ""}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def describe(s: Schedule, fp: str) -> str:
    return f"{MARKER} {s.name} fingerprint={fp} from {Path(s.source).name}" + (f": {s.description}" if s.description else "")


def owned(run) -> tuple[str, str] | None:
    """(schedule name, fingerprint) of a recurring run this reconciler manages, else None."""
    m = re.match(re.escape(MARKER) + r" (\S+) fingerprint=([0-9a-f]+)", run.description or "")
    return (m.group(1), m.group(2)) if m else None


def _status_matches(run, enabled: bool) -> bool:
    """A run paused (or resumed) by hand in the UI drifts from Git: the sync puts it back."""
    status = str(getattr(run, "status", "") or "").upper()
    return status not in ("ENABLED", "DISABLED") or (status == "ENABLED") == enabled


@dataclass
class Action:
    kind: str  # create | keep | replace | delete
    name: str
    reason: str
    schedule: Schedule | None = None
    version_id: str = ""
    pipeline_id: str = ""
    fingerprint: str = ""
    old: list = field(default_factory=list)  # recurring runs to pause and delete


def plan(client, schedules: list[Schedule], experiment_id: str, namespace: str | None,
         service_account: str | None) -> list[Action]:
    with _api_errors("list recurring runs"):
        runs = all_pages(client.list_recurring_runs, "recurring_runs", experiment_id=experiment_id, namespace=namespace)
    current: dict[str, list] = {}
    for run in runs:
        if (key := owned(run)) is not None:
            current.setdefault(key[0], []).append(run)
    versions: dict[str | None, tuple[str, Any]] = {}
    actions = []
    for s in schedules:
        if (s.pipeline, s.pipeline_version) not in versions:
            versions[s.pipeline, s.pipeline_version] = resolve_version(client, s.pipeline_version, s.pipeline)
            check_version_images(versions[s.pipeline, s.pipeline_version][1])
        pipeline_id, version = versions[s.pipeline, s.pipeline_version]
        fp = fingerprint(s, version.pipeline_version_id, service_account)
        existing = current.pop(s.name, [])
        matching = [r for r in existing if owned(r)[1] == fp and _status_matches(r, s.enabled)]
        stale = [r for r in existing if r not in matching[:1]]
        base = dict(name=s.name, schedule=s, version_id=version.pipeline_version_id, pipeline_id=pipeline_id,
                    fingerprint=fp)
        if not existing:
            actions.append(Action("create", reason=f"new ({s.cron}, version {version.display_name})", **base))
        elif matching and not stale:
            actions.append(Action("keep", reason="up to date", **base))
        elif matching:  # left over from an interrupted replace
            actions.append(Action("delete-extra", reason=f"{len(stale)} duplicate(s)", old=stale, **base))
        else:
            actions.append(Action("replace", reason="changed (cron, version, parameters or state)", old=existing, **base))
    for name, runs_left in sorted(current.items()):
        actions.append(Action("delete", name, reason="no file in the schedules folder", old=runs_left))
    return actions


def apply(client, actions: list[Action], experiment_id: str, service_account: str | None, log=print) -> dict:
    """Carry out a plan: create before pausing/deleting, so a replaced schedule never goes missing."""
    counts = {"create": 0, "keep": 0, "replace": 0, "delete": 0, "delete-extra": 0}
    for act in actions:
        counts[act.kind] += 1
        if act.kind in ("create", "replace"):
            s = act.schedule
            with _api_errors(f"create recurring run {act.name}"):
                made = client.create_recurring_run(
                    experiment_id=experiment_id, job_name=act.name, description=describe(s, act.fingerprint),
                    cron_expression=s.cron, max_concurrency=s.max_concurrency, no_catchup=True,
                    params=s.arguments, pipeline_id=act.pipeline_id, version_id=act.version_id, enabled=s.enabled,
                    service_account=service_account or None)
            log(f"created {act.name} ({made.recurring_run_id})")
        for old in act.old:
            with _api_errors(f"remove recurring run {act.name} ({old.recurring_run_id})"):
                client.disable_recurring_run(old.recurring_run_id)
                client.delete_recurring_run(old.recurring_run_id)
            log(f"paused and deleted {act.name} ({old.recurring_run_id})")
    return counts


def plan_table(actions: list[Action]) -> str:
    rows = [[a.kind, a.name, a.reason] for a in actions] or [["-", "-", "no schedules and nothing owned"]]
    return table(["action", "schedule", "why"], rows, align_right=False)


def sync(client, directory: str | Path, pool_file: str | Path | None = None, *, dry_run: bool = False,
         experiment: str = DEFAULT_EXPERIMENT, namespace: str | None = None,
         service_account: str | None = DEFAULT_SERVICE_ACCOUNT, log=print) -> list[Action]:
    schedules = load_schedules(directory, read_pool(pool_file))  # all files valid before any KFP call
    check_server(client)  # KFP >= 2.15 runs what the versions hold
    with _api_errors("experiment"):
        exp = client.create_experiment(experiment, namespace=namespace)
    actions = plan(client, schedules, exp.experiment_id, namespace, service_account)
    log(plan_table(actions))
    if dry_run:
        log("dry run: nothing changed")
        return actions
    counts = apply(client, actions, exp.experiment_id, service_account, log=log)
    log(", ".join(f"{n} {k}" for k, n in counts.items() if n) or "nothing to do")
    return actions


def cmd_schedule_sync(args) -> int:
    namespace = args.namespace or os.environ.get("KFP_NAMESPACE") or None
    load_schedules(args.dir, read_pool(args.pool_file))  # validate before connecting
    client = kfp_client.connect(args.host, namespace)  # looked up at call time: tests replace it
    sync(client, args.dir, args.pool_file, dry_run=args.dry_run,
         experiment=args.experiment or os.environ.get("KFP_EXPERIMENT") or DEFAULT_EXPERIMENT,
         namespace=namespace,
         service_account=args.service_account or os.environ.get("KFP_SERVICE_ACCOUNT") or DEFAULT_SERVICE_ACCOUNT)
    return 0


__all__ = ["MARKER", "Schedule", "load_schedules", "plan", "apply", "sync", "kfp_cron"]
