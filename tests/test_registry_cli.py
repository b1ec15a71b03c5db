"""``llmneo registry ls|show|pull|promote|lineage|history`` on a local folder and on real S3."""

import os
import subprocess
import sys

import pytest

from llmneo.registry import open_registry


def llmneo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llmneo.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def seed(uri, tmp_path):
    reg = open_registry(uri)
    for i in (1, 2):
        d = tmp_path / f"m{i}"
        (d / "sub").mkdir(parents=True)
        (d / "model.safetensors").write_bytes(f"weights {i}".encode())
        (d / "sub" / "tok.json").write_text("{}")
        reg.register("demo", d, {"pipeline_run_id": f"run-{i}", "git_commit": "c0ffee", "config_hash": "cfg",
                                 "dataset_hash": "data", "teacher": "T", "student": "S", "method": "neo"},
                     {"kl_to_teacher": 0.5 / i, "llmneo_mc/acc": 0.25 * i}, aliases=["latest"])
    return reg


def check_session(uri, tmp_path, env=None):
    """The lookups a user runs after a pipeline registered two versions."""
    proc = llmneo("registry", "ls", "--registry", uri, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "latest→v2" in proc.stdout

    proc = llmneo("registry", "ls", "demo", "--registry", uri, env=env)
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:2] == ["version", "created"]
    assert [ln.split()[0] for ln in lines[3:]] == ["v1", "v2"]

    proc = llmneo("registry", "promote", "demo:v1", "production", "--registry", uri, env=env)
    assert proc.returncode == 0 and "demo@production → v1" in proc.stdout, proc.stderr

    proc = llmneo("registry", "show", "demo@production", "--files", "--registry", uri, env=env)
    assert proc.returncode == 0 and "demo:v1" in proc.stdout and "sub/tok.json" in proc.stdout
    assert "kl_to_teacher" in proc.stdout and "0.5" in proc.stdout

    proc = llmneo("registry", "lineage", "demo:v2", "--registry", uri, env=env)
    assert "run-2" in proc.stdout and "c0ffee" in proc.stdout and "dataset_hash" in proc.stdout

    proc = llmneo("registry", "history", "demo", "--registry", uri, env=env)
    assert [ln.split()[1:4] for ln in proc.stdout.splitlines()[2:]] == \
        [["latest", "-", "v1"], ["latest", "v1", "v2"], ["production", "-", "v1"]]

    proc = llmneo("registry", "pull", "demo@production", str(tmp_path / "out"), "--registry", uri, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "all sha256 verified" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"weights 1"


def test_cli_session_local(tmp_path):
    seed(str(tmp_path / "reg"), tmp_path)
    check_session(str(tmp_path / "reg"), tmp_path)


def test_registry_from_environment(tmp_path):
    seed(str(tmp_path / "reg"), tmp_path)
    proc = llmneo("registry", "ls", "demo", env={"LLMNEO_REGISTRY": str(tmp_path / "reg")})
    assert proc.returncode == 0 and f"registry {tmp_path / 'reg'}" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["show", "demo@nope"], "error: registry {reg}: demo has no alias 'nope' (aliases: latest)"),
    (["show", "other"], "error: registry {reg}: no model named 'other'"),
    (["promote", "demo:v7", "production"], "error: registry {reg}: demo:v7 not found (versions: v1, v2)"),
    (["show", "demo:x"], "error: 'demo:x': version must look like v3 or 3"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    seed(str(tmp_path / "reg"), tmp_path)
    proc = llmneo("registry", *args, "--registry", str(tmp_path / "reg"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == message.format(reg=tmp_path / "reg"), proc.stderr


def test_cli_pull_names_the_corrupted_file(tmp_path):
    seed(str(tmp_path / "reg"), tmp_path)
    (tmp_path / "reg" / "demo" / "v2" / "model.safetensors").write_bytes(b"weights X")
    proc = llmneo("registry", "pull", "demo@latest", str(tmp_path / "out"), "--registry", str(tmp_path / "reg"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: demo:v2: model.safetensors: sha256 mismatch")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_cli_session_s3(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/registry"
    seed(uri, tmp_path)
    check_session(uri, tmp_path)  # the subprocesses inherit the AWS_* variables of the test server
