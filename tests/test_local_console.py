"""`llmneo run`'s output (pipelines/local_console.py): the console routing on its own, then around a
two-task pipeline through the real kfp.local (SubprocessRunner): quiet = a line per task and the log
files, --verbose = everything streamed, never a colour code off a terminal."""

import io
import sys
from pathlib import Path

import pytest
from kfp import dsl, local

from llmneo_pipelines import local_console

# ---------------------------------------------------------------------------- the console alone


class Terminal(io.StringIO):
    def isatty(self):
        return True


def console_for(out, interval=30.0):
    return local_console.StepConsole(out, label=lambda task: f"[1/2] {task}", started=lambda task: "note",
                                     finished=lambda run_dir, task: "result", interval=interval)


def test_lines_go_to_the_task_log_and_the_console_gets_start_and_end(tmp_path):
    out = io.StringIO()
    console = console_for(out)
    console.write("before any task\n")
    console.begin(tmp_path, "prep")
    console.write("\x1b[96m'prep'\x1b[0m says hello\nprep: tokenize:  50%|#    | 1/2 [00:00<00:01, 3.1it/s]\n")
    console.end(tmp_path, "prep", 1.25, ok=True)
    console.close()
    log = (tmp_path / "logs" / "prep.log").read_text()
    assert log.startswith("'prep' says hello\n") and "\x1b" not in log
    assert (tmp_path / "logs" / "pipeline.log").read_text() == "before any task\n"
    assert out.getvalue().splitlines() == [
        f"[1/2] prep  note  (log: {tmp_path / 'logs' / 'prep.log'})", "[1/2] prep  done in 1.2 s: result"]


def test_progress_off_a_terminal_is_the_training_bar_at_most_every_interval(tmp_path):
    out = io.StringIO()
    console = console_for(out, interval=0.0)
    console.begin(tmp_path, "distill")
    console.write("Loading weights: 10%|#  | 2/21 [00:00<00:01]\n")
    console.write("[3/5 distill] neo:  50%|#  | 2/4 [00:01<00:01, loss=3.1]\n")
    console.end(tmp_path, "distill", 2.0, ok=True)
    assert out.getvalue().splitlines()[1] == "  [3/5 distill] neo:  50%|#  | 2/4 [00:01<00:01, loss=3.1]"
    assert len(out.getvalue().splitlines()) == 3


def test_on_a_terminal_every_bar_is_redrawn_in_place(tmp_path):
    out = Terminal()
    console = console_for(out)
    console.begin(tmp_path, "prep")
    console.write("read: 3 rows [00:00, 9.0 rows/s]\n")
    console.end(tmp_path, "prep", 1.0, ok=True)
    assert "\r\x1b[K  read: 3 rows [00:00, 9.0 rows/s]\r\x1b[K[1/2] prep  done" in out.getvalue()


def test_a_failed_task_shows_the_end_of_its_log(tmp_path):
    out = io.StringIO()
    console = console_for(out)
    console.begin(tmp_path, "distill")
    console.write("".join(f"line {i}\n" for i in range(40)) + "Traceback: boom")
    console.end(tmp_path, "distill", 3.0, ok=False)
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("[1/2] distill  FAILED after 3.0 s; the end of ")
    assert lines[2:] == [f"    line {i}" for i in range(26, 40)] + ["    Traceback: boom"]


# ---------------------------------------------------------------------------- around real kfp.local


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def shout(word: str) -> str:
    import sys

    print(f"component says {word}")
    print(f"to stderr {word}", file=sys.stderr)
    return word.upper()


@dsl.pipeline(name="console-test")
def two_tasks():
    first = shout(word="one")
    shout(word=first.output)


@pytest.fixture
def kfp_root(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    return tmp_path


@pytest.mark.integration
def test_quiet_run_routes_each_task_into_its_log(kfp_root, capsys):
    seen = []

    def finished(run_dir, task):  # called once the task's outputs are in its folder
        seen.append((run_dir / task / "executor_output.json").is_file())
        return "ok"

    console = local_console.StepConsole(sys.stdout, label=lambda task: f"[?] {task}", finished=finished)
    with local_console.routed(console):
        two_tasks()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["[?] shout", "[?] shout", "[?] shout-2", "[?] shout-2"]
    assert lines[1].startswith("[?] shout  done in ") and lines[1].endswith(" s: ok") and seen == [True, True]
    assert captured.err == "" and "\x1b[" not in captured.out
    (run_dir,) = [p for p in kfp_root.iterdir() if p.is_dir()]
    first, second = (run_dir / "logs" / f"{t}.log" for t in ("shout", "shout-2"))
    assert "Got executor_input" in first.read_text() and "component says one" in first.read_text()
    assert "to stderr ONE" in second.read_text() and "\x1b[" not in second.read_text()
    assert "Running pipeline" in (run_dir / "logs" / "pipeline.log").read_text()
    assert f"(log: {first})" in lines[0]


@pytest.mark.integration
def test_verbose_streams_everything_without_colour_off_a_terminal(kfp_root, capsys):
    with local_console.streamed():
        two_tasks()
    out = capsys.readouterr().out
    assert "Got executor_input" in out and "component says one" in out and "to stderr ONE" in out
    assert "Executing task 'shout'" in out and "\x1b[" not in out
    assert "have no effect in the current local runner" not in out
    assert not list(Path(kfp_root).glob("*/logs"))
