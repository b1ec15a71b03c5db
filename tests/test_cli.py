"""User mistakes print one line and exit 2, never a traceback."""

import subprocess
import sys

import pytest


def llmneo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmneo.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["config", "distill.alpha=2"], "error: distill.alpha: must be <= 1.0, got 2"),
    (["config", "--preset", "nope"], "error: preset: unknown preset 'nope'"),
    (["prep", "--out", "x", "data.source=/does/not/exist.jsonl"], "error: data.source: '/does/not/exist.jsonl' does not exist"),
    (["teacher", "--dataset", "d", "--teacher-out", "t", "--student-out", "s", "teacher.source=/nowhere"],
     "error: teacher.source: '/nowhere' is not a Hugging Face model folder"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    proc = llmneo(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_config_prints_resolved_yaml():
    proc = llmneo("config", "--preset", "tiny", "distill.alpha=0.75")
    assert proc.returncode == 0
    assert "alpha: 0.75" in proc.stdout and "# config hash" in proc.stdout


def test_config_keys_lists_descriptions():
    proc = llmneo("config", "--keys")
    assert "distill.alpha" in proc.stdout and "loss = (1-alpha)*CE" in proc.stdout
