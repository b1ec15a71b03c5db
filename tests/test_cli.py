"""User mistakes print one line and exit 2, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

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


def _subcommands(parser) -> dict:
    return next(a for a in parser._actions if a.dest == "command").choices


def test_console_script_is_the_library_cli_plus_the_kfp_commands():
    """`llmneo` (pyproject [project.scripts]) = llmneo_pipelines.cli: every library subcommand, plus
    run/upload/submit/schedule/prune-checkpoints, which the library's own parser does not have."""
    import tomllib

    from conftest import REPO
    from llmneo import cli as library_cli
    from llmneo_pipelines import cli as console

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"llmneo": "llmneo_pipelines.cli:main"}
    library = set(_subcommands(library_cli.build_parser()))
    full = set(_subcommands(console.build_parser()))
    assert library == {"config", "generate", "prep", "teacher", "distill", "merge-eval", "register", "compare", "registry"}
    assert full == library | {"run", "upload", "submit", "schedule", "prune-checkpoints", "sweep"}


def test_step_subcommands_follow_the_steps_table():
    """One subcommand per STEPS row, in order, with the row's folder options (the CLI's contract)."""
    from llmneo import cli as library_cli
    from llmneo.steps import STEPS

    assert [s.name for s in STEPS] == ["generate", "prep", "teacher", "distill", "merge-eval", "register"]
    assert [s.task for s in STEPS] == ["generate-answers", "prep-data", "load-teacher", "distill", "merge-eval",
                                       "register"]
    commands = _subcommands(library_cli.build_parser())
    for step in STEPS:
        options = {o for a in commands[step.name]._actions for o in a.option_strings if a.required}
        assert options == {f"--{o}" for o in (*step.inputs, *step.outputs)}, step.name
    expected = {"generate": ["--out"], "prep": ["--out"], "teacher": ["--dataset", "--teacher-out", "--student-out"],
                "distill": ["--dataset", "--teacher", "--student", "--out"],
                "merge-eval": ["--dataset", "--teacher", "--student", "--adapter", "--out"],
                "register": ["--model"]}
    assert {s.name: [f"--{o}" for o in (*s.inputs, *s.outputs)] for s in STEPS} == expected


def test_step_subcommand_calls_the_step_function_with_folders_in_order(monkeypatch, tmp_path, capsys):
    from llmneo import cli as library_cli
    from llmneo import steps

    seen = []
    rows = [steps.Step(s.name, s.task, s.label, lambda cfg, *folders, **kw: seen.append((folders, kw)) or
                       {"name": "m", "version": "v1", "uri": "u", "ok": 1}, s.inputs, s.outputs, s.description)
            for s in steps.STEPS]
    monkeypatch.setattr(library_cli, "STEPS", tuple(rows))
    assert library_cli.main(["teacher", "--dataset", "d", "--teacher-out", "t", "--student-out", "s", "--json"]) == 0
    assert seen[-1] == ((Path("d"), Path("t"), Path("s")), {})
    assert '"ok": 1' in capsys.readouterr().out
    assert library_cli.main(["register", "--model", "m", "--run-id", "r1"]) == 0
    assert seen[-1] == ((Path("m"),), {"run_id": "r1", "force": None, "aliases": []})
    assert capsys.readouterr().out.strip() == "registered m:v1 at u"


def test_a_step_alone_prints_its_summary_line_and_json_on_request(monkeypatch, capsys):
    from llmneo import cli as library_cli
    from llmneo import steps
    from llmneo.cards import DatasetCard

    card = DatasetCard(counts={"train": 57, "val": 11, "rejected": 0}, dataset_hash="abc")
    rows = [steps.Step(s.name, s.task, s.label, lambda cfg, *folders, **kw: card, s.inputs, s.outputs,
                       s.description) for s in steps.STEPS]
    monkeypatch.setattr(library_cli, "STEPS", tuple(rows))
    assert library_cli.main(["prep", "--out", "runs/x/dataset"]) == 0
    assert capsys.readouterr().out.splitlines() == ["57 train / 11 val rows, 0 rejected", "output: runs/x/dataset"]
    assert library_cli.main(["prep", "--out", "runs/x/dataset", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == card.to_dict()


def test_run_takes_verbose():
    from llmneo_pipelines.cli import build_parser

    assert build_parser().parse_args(["run", "--verbose"]).verbose is True
    assert build_parser().parse_args(["run", "--preset", "tiny"]).verbose is False


def test_version():
    from llmneo import __version__

    proc = llmneo("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"llmneo {__version__}"


def _parsers(parser):
    """Every parser reachable from ``parser`` (subcommands, their subcommands, ...)."""
    yield parser
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        for sub in (choices.values() if isinstance(choices, dict) else ()):
            if hasattr(sub, "_actions"):
                yield from _parsers(sub)


def test_every_option_has_plain_help():
    """Every option and argument of every command says what it is, in plain text (no RST markup)."""
    from llmneo_pipelines import cli as console

    parser = console.build_parser()
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in _parsers(parser) for a in p._actions
               if a.help is None and not a.choices]
    assert missing == []
    for p in _parsers(parser):
        text = p.format_help()
        assert "``" not in text and ":mod:" not in text, p.prog


def test_keys_table_fits_the_terminal():
    import os

    env = {**os.environ, "COLUMNS": "90"}
    proc = subprocess.run([sys.executable, "-m", "llmneo.cli", "config", "--keys"], capture_output=True,
                          text=True, env=env)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and max(len(line) for line in lines) <= 90
    assert "distill.alpha" in proc.stdout
    # not a terminal and no $COLUMNS: one line per key, for grep
    env.pop("COLUMNS")
    proc = subprocess.run([sys.executable, "-m", "llmneo.cli", "config", "--keys"], capture_output=True,
                          text=True, env=env)
    from llmneo.config import describe_fields

    assert len(proc.stdout.splitlines()) == len(describe_fields()) + 2


@pytest.mark.parametrize("args, message", [
    (["config", "--preset", "/nope.yaml"], "error: preset /nope.yaml: file does not exist"),
    (["config", "alpha=0.9"], "error: alpha: unknown key (did you mean distill.alpha?)"),
    (["config", "lora_rnk=8"], "error: lora_rnk: unknown key (did you mean distill.lora_rank?)"),
])
def test_preset_and_key_mistakes_point_at_the_fix(tmp_path, args, message):
    proc = llmneo(*args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_local_summary_names_the_run_id_recorded_in_the_lineage(tmp_path):
    """kfp.local names the run folder after the time; the summary prints the id the registry lineage
    recorded, so a registered version can be traced back to its run folder."""
    import json

    from llmneo_pipelines.local_run import registered_run_id, summarize

    version = tmp_path / "registry" / "demo" / "v1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text(json.dumps({"lineage": {"pipeline_run_id": "81279140"}}))
    assert registered_run_id(f"demo:v1@{version}") == "81279140"
    assert registered_run_id(f"demo:v2@{tmp_path / 'nowhere'}") is None and registered_run_id(None) is None
    run = tmp_path / "kfp" / "llm-neo-2026-11-29-00-50-27-130521"
    (run / "register").mkdir(parents=True)
    (run / "register" / "executor_output.json").write_text(
        json.dumps({"parameterValues": {"Output": f"demo:v1@{version}"}}))
    text, facts = summarize(run, 12.0)
    assert facts["run_id"] == "81279140"
    assert f"run folder:       {run}" in text and "run id:           81279140" in text
    # the table's times are the steps' own work, not the task times of the progress lines: it says so
    assert text.splitlines()[0].split() == ["step", "work", "s", "result"]
    assert "work s: the step's own work (its card); the 'done in' times above are whole tasks" in text


def test_make_help_lists_the_targets_the_readme_names_and_real_sections():
    """`make help` lists every `make TARGET` the README sends users to, and each README section it
    points at exists."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-s", "help"], cwd=root, capture_output=True, text=True, check=True).stdout
    readme = (root / "README.md").read_text()
    listed = set(re.findall(r"^make ([\w-]+)", out, re.M))
    assert {"run-tiny", "test-fast", "compare"} <= listed
    assert set(re.findall(r"`make ([\w-]+)`", readme)) <= listed | {"help"}
    sections = {line.lstrip("#").strip() for line in readme.splitlines() if line.startswith("#")}
    for name in re.findall(r"README '([^']+)'", out):
        assert name in sections, name
    assert "the seed's" not in out
