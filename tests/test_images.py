"""images/: the Dockerfiles install exactly the pinned versions (pyproject.toml, requirements.lock,
the Makefile's --no-deps pins), run as a non-root user with caches on a volume, name no registry
host; and the light CPU image's package set really runs registration and the CLI without torch.
(No Docker engine here: `make images` builds them where one exists.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import tomllib

from conftest import REPO
from llmneo.cards import EvalCard, weight_digests

DOCKERFILES = {"cuda": REPO / "images" / "Dockerfile", "cpu": REPO / "images" / "Dockerfile.cpu"}
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s]+)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def pip_installs(path) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions."""
    out = []
    for op, args in instructions(path):
        if op == "RUN":
            for cmd in args.split("&&"):
                words = shlex.split(cmd)
                if words[:2] == ["pip", "install"]:
                    out.append(words[2:])
    return out


def project_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {norm(m.group(1)): m.group(2) for d in deps if (m := PIN.match(d.strip()))}


def lock_pins() -> dict[str, str]:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    return {norm(m.group(1)): m.group(2) for line in lines if (m := PIN.match(line.strip()))}


def makefile_no_deps_pins() -> dict[str, str]:
    text = (REPO / "Makefile").read_text()
    (line,) = [row for row in text.splitlines() if "--no-deps" in row and "pip install" in row]
    return {norm(m.group(1)): m.group(2) for w in line.split() if (m := PIN.match(w))}


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_installs_the_pinned_versions(kind):
    project, lock, no_deps = project_pins(), lock_pins(), makefile_no_deps_pins()
    installs = pip_installs(DOCKERFILES[kind])
    assert installs
    pinned = {}
    for args in installs:
        reqs = [a for a in args if not a.startswith("-") and a != "requirements.lock"]
        for req in reqs:
            m = PIN.match(req)
            assert req == "." or m, f"{kind}: unpinned requirement {req!r}"
            if m:
                pinned[norm(m.group(1))] = m.group(2)
        if "." in reqs and "--no-deps" not in args:
            assert args[:2] == ["-c", "requirements.lock"], f"{kind}: the package must resolve against the lock"
        if "--no-deps" not in args and reqs != ["torch==2.13.0"]:
            assert "-c" in args, f"{kind}: {args} resolves dependencies without -c requirements.lock"
    for name, version in pinned.items():
        expected = project.get(name) or no_deps.get(name) or lock.get(name)
        assert expected == version, f"{kind}: {name}=={version}, but the project pins {expected}"
    assert pinned.get("torch", project["torch"]) == project["torch"] == "2.13.0"
    if kind == "cuda":
        assert pinned["torch"] == "2.13.0"
        assert {k: pinned[k] for k in no_deps} == no_deps  # torchx / SmolLM2 exactly as `make setup`
    else:
        assert "torch" not in pinned  # the light image has no torch


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_non_root_caches_on_a_volume_no_registry_host(kind):
    path = DOCKERFILES[kind]
    ins = instructions(path)
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert ("VOLUME", "/cache") in ins
    env = " ".join(a for op, a in ins if op == "ENV")
    assert "LLMNEO_CACHE=/cache/" in env
    if kind == "cuda":
        assert "HF_HOME=/cache/" in env
    for image in (a for op, a in ins if op == "FROM"):
        first = image.split("/")[0]
        assert "/" not in image or ("." not in first and ":" not in first), f"registry host in FROM {image}"
    text = path.read_text()
    assert "://" not in text and "index-url" not in text and "find-links" not in text


def test_image_references_follow_the_package_version():
    from llmneo_components import images

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert images.VERSION == version
    assert images.DEFAULT_IMAGE == f"llmneo/llmneo:{version}" and images.DEFAULT_CPU_IMAGE == f"llmneo/llmneo-cpu:{version}"
    pipeline = (REPO / "pipelines" / "llm_neo.yaml").read_text()
    assert f"image: {images.DEFAULT_IMAGE}" in pipeline and f"image: {images.DEFAULT_CPU_IMAGE}" in pipeline


def test_make_images_explains_when_no_engine_runs(tmp_path):
    env = {"PATH": str(tmp_path) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    for engine in ("docker", "podman"):  # a docker CLI whose engine is down, a podman that cannot run
        (tmp_path / engine).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / engine).chmod(0o755)
    (tmp_path / "id").write_text("#!/bin/sh\necho 1000\n")  # not root: nothing gets installed
    (tmp_path / "id").chmod(0o755)
    proc = subprocess.run(["make", "-s", "images"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "no container engine on this machine" in proc.stdout


# --------------------------------------------------------------------------------------------
# The light image's package set, emulated: block every module of a distribution it does not install
# --------------------------------------------------------------------------------------------


def cpu_image_closure() -> set[str]:
    """Distributions the CPU Dockerfile installs: its pinned roots and their requirements."""
    from importlib import metadata

    from packaging.requirements import Requirement

    roots = [norm(PIN.match(a).group(1)) for args in pip_installs(DOCKERFILES["cpu"]) for a in args if PIN.match(a)]
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def test_light_image_runs_register_and_the_cli_without_torch(tmp_path):
    from importlib import metadata

    keep = cpu_image_closure() | {"llmneo"}
    assert "torch" not in keep and "kfp" in keep and "boto3" in keep
    blocked = set()
    for dist in metadata.distributions():
        if norm(dist.metadata["Name"]) in keep:
            continue
        tops = (dist.read_text("top_level.txt") or "").split()
        tops += [f.parts[0].removesuffix(".py") for f in dist.files or [] if f.suffix == ".py" and len(f.parts) <= 2]
        blocked |= {t for t in tops if t.isidentifier() and t not in sys.stdlib_module_names}
    blocked -= {"llmneo", "llmneo_components", "llmneo_pipelines", "llmneo_presets", "_distutils_hack", "pkg_resources",
                "setuptools"}
    assert {"torch", "transformers", "numpy"} <= blocked

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x01" * 64)
    (model / "eval.json").write_text(json.dumps({"metrics": {"kl_to_teacher": 0.1}, "method": "neo"}))
    EvalCard(method="neo", metrics={"kl_to_teacher": 0.1}, gate={"passed": True, "reasons": []},
             weights=weight_digests(model)).write(model)
    script = f"""
import importlib.abc, json, sys
BLOCKED = {sorted(blocked)!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the light image")
sys.meta_path.insert(0, Block())
from llmneo_pipelines.cli import main
from llmneo.config import load_config
from llmneo.steps import register_model
import llmneo_pipelines.kfp_client, llmneo_pipelines.schedules
cfg = load_config("tiny", ["registry.uri={tmp_path / 'registry'}"])
manifest = register_model(cfg, {str(model)!r}, "run-1")
print(json.dumps({{"version": manifest["version"], "files": len(manifest["files"])}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["files"] >= 2
    proc = subprocess.run([sys.executable, "-c", script.split("from llmneo_pipelines.cli")[0] +
                           "from llmneo_pipelines.cli import main\nsys.exit(main(['schedule', 'sync', '--help']))"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout, proc.stderr
