"""``llmneo registry ls|show|pull|promote|lineage|history`` on a local folder and on real S3."""

import json
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
    (["show", "other"], "error: registry {reg}: no model named 'other' (models: demo)"),
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


def damage(reg_dir):
    """What a crashed writer or a careless hand leaves: v1's manifest truncated, v2's missing keys,
    and a garbage newest event for the alias ``latest``."""
    v1 = reg_dir / "demo" / "v1" / "manifest.json"
    v1.write_bytes(v1.read_bytes()[:40])
    v2 = reg_dir / "demo" / "v2" / "manifest.json"
    m = json.loads(v2.read_text())
    del m["files"], m["created"]
    v2.write_text(json.dumps(m))
    (reg_dir / "demo" / "_aliases" / "latest" / "00000003.json").write_bytes(b"\x00garbage{")


def test_cli_listing_flags_damaged_entries_and_lists_the_rest(tmp_path):
    reg_dir = tmp_path / "reg"
    seed(str(reg_dir), tmp_path)
    d = tmp_path / "m3"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights 3")
    open_registry(str(reg_dir)).register("demo", d, {"pipeline_run_id": "run-3"}, {"kl_to_teacher": 0.1})
    d = tmp_path / "other"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"other")
    open_registry(str(reg_dir)).register("other", d, {}, {})
    damage(reg_dir)
    reg = str(reg_dir)
    v1_line = f"warning: registry {reg}: demo:v1: damaged manifest.json: not JSON ("
    v2_line = f"warning: registry {reg}: demo:v2: damaged manifest.json: missing created, files (skipped)"
    event_line = (f"warning: registry {reg}: demo@latest: damaged alias event 3 "
                  f"(demo/_aliases/latest/00000003.json; skipped)")

    proc = llmneo("registry", "ls", "--registry", reg)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines()[3:]}
    assert rows["demo"][1:3] == ["3", "v3"] and rows["other"][1:3] == ["1", "v1"]
    assert "latest→v2" in proc.stdout  # the newest readable event of the alias
    assert proc.stderr.splitlines() == [event_line]

    proc = llmneo("registry", "ls", "demo", "--registry", reg)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln.split()[0] for ln in proc.stdout.splitlines()[3:]] == ["v3"]  # v1 and v2 flagged, not listed
    assert "run-3" in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and lines[0] == event_line and lines[1].startswith(v1_line) and lines[2] == v2_line

    proc = llmneo("registry", "history", "demo", "--registry", reg)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln.split()[1:4] for ln in proc.stdout.splitlines()[2:]] == [["latest", "-", "v1"], ["latest", "v1", "v2"]]
    assert proc.stderr.splitlines() == [event_line]

    proc = llmneo("registry", "show", "demo:v3", "--registry", reg)
    assert proc.returncode == 0 and "demo:v3" in proc.stdout, proc.stderr
    proc = llmneo("registry", "show", "demo:v2", "--registry", reg)  # the damaged one itself: one line
    assert proc.returncode == 2 and proc.stderr == f"error: registry {reg}: demo:v2: damaged manifest.json: " \
                                                   f"missing created, files\n"


def test_cli_promote_that_changes_nothing_adds_no_history_row(tmp_path):
    seed(str(tmp_path / "reg"), tmp_path)
    reg = str(tmp_path / "reg")
    for _ in range(2):
        proc = llmneo("registry", "promote", "demo:v1", "production", "--registry", reg)
        assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "demo@production → v1 (already; nothing changed)"
    proc = llmneo("registry", "promote", "demo:v2", "latest", "--registry", reg)  # latest is v2 already
    assert proc.stdout.strip() == "demo@latest → v2 (already; nothing changed)"
    proc = llmneo("registry", "history", "demo", "--registry", reg)
    assert [ln.split()[1:4] for ln in proc.stdout.splitlines()[2:]] == \
        [["latest", "-", "v1"], ["latest", "v1", "v2"], ["production", "-", "v1"]]
    assert sorted(p.name for p in (tmp_path / "reg" / "demo" / "_aliases").rglob("*.json")) == \
        ["00000001.json", "00000001.json", "00000002.json"]


def test_ls_on_a_missing_registry_is_an_error(tmp_path):
    proc = llmneo("registry", "ls", "--registry", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"error: registry {tmp_path / 'nowhere'}: no such folder"), proc.stderr
    (tmp_path / "empty").mkdir()
    proc = llmneo("registry", "ls", "--registry", str(tmp_path / "empty"))
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "(empty)"


def test_ls_and_show_of_an_unknown_name_suggest_the_closest(tmp_path):
    seed(str(tmp_path / "reg"), tmp_path)
    reg = str(tmp_path / "reg")
    for args in (["ls", "demp"], ["show", "demp:v1"], ["pull", "demp", str(tmp_path / "x")]):
        r = llmneo("registry", *args, "--registry", reg)
        assert r.returncode == 2 and r.stderr == f"error: registry {reg}: no model named 'demp' (did you mean demo?)\n"
    r = llmneo("registry", "ls", "zzz", "--registry", reg)
    assert r.stderr == f"error: registry {reg}: no model named 'zzz' (models: demo)\n"


def test_ls_flags_a_planted_link_and_lists_the_rest(tmp_path):
    reg = str(tmp_path / "reg")
    seed(reg, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "reg" / "evil", target_is_directory=True)
    r = llmneo("registry", "ls", "--registry", reg)
    assert r.returncode == 0 and "demo" in r.stdout and "evil" not in r.stdout
    assert r.stderr == f"warning: registry {reg}: evil is a symbolic link (skipped; remove it)\n"
