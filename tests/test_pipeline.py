"""The DAG compiles, holds the six steps and the gate, and the committed YAML has not drifted."""

import ast
import subprocess
import sys

import yaml

from conftest import REPO

TASKS = {"generate-answers", "prep-data", "load-teacher", "distill", "merge-eval", "register"}


def compile_to(tmp_path):
    out = tmp_path / "llm_neo.yaml"
    env_clean = {k: v for k, v in __import__("os").environ.items() if k not in ("LLMNEO_IMAGE", "LLMNEO_CPU_IMAGE")}
    subprocess.run([sys.executable, "-m", "llmneo_pipelines.llm_neo", "--output", str(out)], check=True,
                   env=env_clean, capture_output=True)
    return out


def pipeline_spec(path):
    """The pipeline spec (first YAML document; the second is the kfp-kubernetes platform spec)."""
    return next(yaml.safe_load_all(path.read_text()))


def all_tasks(spec):
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_compiles_with_five_tasks_and_gate(tmp_path):
    spec = pipeline_spec(compile_to(tmp_path))
    tasks = all_tasks(spec)
    assert TASKS <= set(tasks)
    (gate_id,) = [k for k, t in spec["root"]["dag"]["tasks"].items() if t["taskInfo"]["name"] == "registration-gate"]
    gate = tasks[gate_id]
    assert "trigger_policy" not in gate  # the gate is the condition *around* register
    register = spec["components"][f"comp-{gate_id}"]["dag"]["tasks"]["register"]
    assert register["cachingOptions"] == {}  # never cached (side effects)
    cond = spec["root"]["dag"]["tasks"][gate_id]["triggerPolicy"]["condition"]
    assert "merge-eval-Output" in cond and "'pass'" in cond
    for name in ("prep-data", "load-teacher", "distill"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 1
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"preset", "overrides", "config", "max_kl_to_teacher", "distill_gpus", "distill_nodes", "eval_gpus",
                           "gpu_node_selector", "gpu_tolerations", "registry_uri"}
    assert all(p.get("description") for p in params.values())


def test_committed_yaml_has_not_drifted(tmp_path):
    fresh = compile_to(tmp_path).read_text()
    committed = (REPO / "pipelines" / "llm_neo.yaml").read_text()
    assert fresh == committed, "pipelines/llm_neo.yaml is stale: run `make pipeline` and commit it"


KFP_SIDE = ("kfp", "llmneo_pipelines", "llmneo_components")


def _docstrings(tree) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions."""
    owners = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                    ast.AsyncFunctionDef)))]
    return {id(o.body[0].value) for o in owners if o.body and isinstance(o.body[0], ast.Expr)
            and isinstance(o.body[0].value, ast.Constant) and isinstance(o.body[0].value.value, str)}


def test_library_knows_nothing_of_kfp():
    """No module of llmneo/ imports kfp or the KFP-side packages, not even lazily or by name (a string
    for importlib): the console script (pipelines/cli.py) adds the KFP commands to the library's CLI."""
    for path in (REPO / "llmneo").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in KFP_SIDE for n in names), f"{path} imports {names}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not any(f"{p}." in node.value or node.value == p for p in KFP_SIDE[1:]), \
                    f"{path}:{node.lineno} names a KFP-side module: {node.value!r}"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
                # the one import by name allowed: storage backends, always below llmneo.storage
                arg = node.args[0] if node.args else None
                head = arg.values[0] if isinstance(arg, ast.JoinedStr) and arg.values else arg
                assert isinstance(head, ast.Constant) and str(head.value).startswith("llmneo.storage."), \
                    f"{path}:{node.lineno} imports by name"
            elif isinstance(node, ast.Attribute) and node.attr == "__import__":
                raise AssertionError(f"{path}:{node.lineno} imports by name")


def test_library_loads_without_kfp():
    """Every module of llmneo/ imports with kfp and the KFP-side packages unimportable, and the
    library's CLI parses and runs a subcommand."""
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for p in (REPO / "llmneo").rglob("*.py"))
    script = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {KFP_SIDE!r}:
            raise ImportError(name + " must not be imported by llmneo")
sys.meta_path.insert(0, Block())
for m in {modules!r}:
    importlib.import_module(m)
from llmneo.cli import build_parser, main
assert "run" not in build_parser()._subparsers._group_actions[0].choices
sys.exit(main(["config", "--list"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny" in proc.stdout.split()


def test_components_import_only_stdlib_and_kfp_at_top():
    allowed = set(sys.stdlib_module_names) | {"kfp", "llmneo_components"}
    for path in (REPO / "components").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for m in mods:
                assert m.split(".")[0] in allowed, f"{path.name}: top-level import {m}"


def test_component_python_funcs_are_thin():
    """Each component body calls exactly one function of llmneo.steps.STEPS (one piece of code per
    step), and every step has its component; the sweep's own components (sweep_*.py) each call one
    function of llmneo.sweep."""
    from llmneo import sweep
    from llmneo.steps import STEPS

    functions = {s.function.__name__ for s in STEPS}
    called = set()
    for path in (REPO / "components").glob("*.py"):
        if path.name in ("__init__.py", "images.py", "params.py"):  # params.py: shared helpers, no step
            continue
        tree = ast.parse(path.read_text())
        module = "llmneo.sweep" if path.name.startswith("sweep_") else "llmneo.steps"
        imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == module for a in node.names]
        if module == "llmneo.sweep":
            assert len(imported) == 1 and callable(getattr(sweep, imported[0])), (path.name, imported)
            continue
        assert len(imported) == 1 and imported[0] in functions, (path.name, imported)
        called.add(imported[0])
    assert called == functions


def test_every_library_package_is_in_the_distribution():
    """pyproject.toml lists packages explicitly: a new subpackage missing there installs fine in
    editable mode and breaks every image (``pip install .``)."""
    import tomllib

    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "llmneo").rglob("__init__.py")}
    assert found <= packages, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - packages)}"
