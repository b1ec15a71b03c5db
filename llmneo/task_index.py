"""lm-eval task names without initialising lm-eval: what ``eval.lm_eval_tasks`` is checked against
when the configuration loads.

The repo's own tasks (``llmneo/tasks/*.yaml``) are read directly. Installed lm-eval tasks come from a
text scan of lm-eval's task folder for ``task:`` / ``group:`` / ``tag:`` entries (about 2 s for ~14k
files), cached per lm-eval version in ``$LLMNEO_CACHE`` (default ``~/.cache/llmneo``; no cache when
the folder is not writable, e.g. a read-only root filesystem). Building lm-eval's own ``TaskManager``
index instead takes ~16 s and imports torch; it is only consulted to confirm a name the scan missed
(a handful of names built by Python code), so a correct configuration never pays for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks"
# a top-level (possibly quoted) key of a task YAML, and the items of a block list under it
_KEY = re.compile(r"""^["']?(task|group|tag)["']?:[ \t]*(\S.*)?$""")
_ITEM = re.compile(r"^\s*-\s+([A-Za-z0-9_.\-]+)\s*$")


def local_task_names() -> set[str]:
    """Task names defined by the YAMLs shipped in ``llmneo/tasks/``."""
    names = set()
    for path in TASK_DIR.glob("*.yaml"):
        m = re.search(r"^task:\s*(\S+)", path.read_text(encoding="utf-8"), re.MULTILINE)
        if m:
            names.add(m.group(1))
    return names


def _names_in(text: str) -> set[str]:
    names: set[str] = set()
    in_list = False
    for line in text.splitlines():
        m = _KEY.match(line)
        if m:
            value = (m.group(2) or "").split(" #")[0].strip()
            in_list = not value
            if value.startswith("["):
                names.update(v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip())
            elif value and not value.startswith(("!", "{")):
                names.add(value.strip("'\""))
            continue
        if in_list:
            item = _ITEM.match(line)
            if item:
                names.add(item.group(1))
            elif line.strip() and not line.startswith((" ", "\t", "-")):
                in_list = False
    return names


def scan_task_dir(root: Path) -> set[str]:
    """Every task/group/tag name written in the YAML files under ``root`` (lm-eval's templates
    ``*_yaml`` and extension-less includes too: tags are often declared there)."""
    names: set[str] = set()
    for path in root.rglob("*"):
        if path.is_file() and (path.name.endswith("yaml") or "." not in path.name):
            try:
                names |= _names_in(path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
    return names


def _cache_file(lm_eval_version: str) -> Path:
    base = Path(os.environ.get("LLMNEO_CACHE") or Path.home() / ".cache" / "llmneo")
    return base / f"lm_eval_tasks-{lm_eval_version}.json"


def installed_task_names() -> set[str] | None:
    """Names of the installed lm-eval's tasks, groups and tags; None when lm-eval is not installed
    (the light image): then only the repo's task names can be checked."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        lm_eval_version = installed_version("lm_eval")
    except PackageNotFoundError:
        lm_eval_version = "unknown"
    cache = _cache_file(lm_eval_version)
    try:
        return set(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    names = scan_task_dir(Path(next(iter(spec.submodule_search_locations))) / "tasks")
    try:  # a cache is an optimisation: a read-only or full disk only costs the scan next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(sorted(names)))
        tmp.replace(cache)
    except OSError:
        pass
    return names


def _task_manager_has(names: list[str]) -> list[str]:
    """The subset of ``names`` lm-eval's own index knows (slow: imports lm-eval and torch)."""
    try:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager(include_path=str(TASK_DIR)).all_tasks)
    except Exception:  # noqa: BLE001 - lm-eval broken or unimportable: keep the scan's verdict
        return []
    return [n for n in names if n in known]


def unknown_tasks(tasks: list[str]) -> list[str]:
    """The names in ``tasks`` that are neither repo tasks nor installed lm-eval tasks/groups/tags.
    Repo names alone never touch lm-eval; without lm-eval, only ``llmneo_*`` names are checked."""
    local = local_task_names()
    rest = [t for t in tasks if t not in local]
    if not rest:
        return []
    typos = [t for t in rest if t.startswith("llmneo_")]
    others = [t for t in rest if not t.startswith("llmneo_")]
    installed = installed_task_names() if others else set()
    if installed is None:
        return typos
    missing = [t for t in others if t not in installed]
    if missing:  # the scan can miss names generated by Python code: ask lm-eval itself
        found = set(_task_manager_has(missing))
        missing = [t for t in missing if t not in found]
    return typos + missing
