"""What ``llmneo run`` shows while kfp.local runs the DAG: one line when a step starts (with the path of
its log file), its progress bar, one line when it ends (time and key result), and nothing else; each
step's full output goes to ``<run folder>/logs/<task>.log``. ``--verbose`` streams everything instead.

How kfp.local (SubprocessRunner) prints: it runs each task as a subprocess whose stdout+stderr are
piped back and ``print``-ed line by line by this process (tqdm's ``\\r`` updates arrive as lines), and
it logs its own messages ("Executing task", the outputs) through a root-logger handler on the
``sys.stdout`` of that moment, warnings go to ``sys.stderr``. So :func:`routed` swaps ``sys.stdout``
and ``sys.stderr`` for a :class:`StepConsole` for the run, and wraps kfp.local's per-task function to
learn which task runs (its name and run folder) — no parsing of kfp's messages.

Colour codes (kfp colours task names and statuses) never reach a file, nor a console that is not a
terminal.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# tqdm's elapsed-time field: "12/40 [00:03<00:08, ...]", "0 rows [00:00, ? rows/s]"
PROGRESS = re.compile(r"\[\d+:\d\d(?::\d\d)?[<,\]]")
# the trainer's bar ("[3/5 distill] neo: 40%|...", llmneo.trainer): the one shown when not on a terminal
STEP_BAR = re.compile(r"^\[\d+/\d+ ")
# kfp.local warnings about settings it ignores by design (resources, images): noise for `llmneo run`
KFP_NOISE = (r"Task '.*': settings .* have no effect", r"You may be attemp?ting to run a task that uses custom")
TAIL_LINES = 15  # of a failed step's log, shown on the console


class PlainStream:
    """A text stream that drops colour codes on the way to ``stream`` (verbose output, not a terminal)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


class StepConsole:
    """The stream kfp.local writes to during a quiet run: every line goes to the running task's log
    file (or ``logs/pipeline.log`` between tasks); progress lines are also shown on ``console`` —
    every bar redrawn in place on a terminal, else the training bar's line at most every ``interval``
    seconds (a log file or CI console keeps every line it is given).

    ``label(task)`` names a task on the console (e.g. ``[3/5] NEO distill``); ``started(task)`` and
    ``finished(run_dir, task)`` give the text after it on the start and end lines."""

    def __init__(self, console: TextIO, label: Callable[[str], str],
                 started: Callable[[str], str] = lambda task: "",
                 finished: Callable[[Path, str], str] = lambda run_dir, task: "", interval: float = 30.0):
        self.console = console
        self.tty = console.isatty()
        self.label, self.started, self.finished = label, started, finished
        self.interval = interval
        self.pending: list[str] = []  # lines before the first task: the run folder is not known yet
        self.partial = ""
        self.log: TextIO | None = None
        self.pipeline_log: TextIO | None = None
        self.logs_dir: Path | None = None
        self.opened: set[str] = set()
        self.shown_at = 0.0
        self.progress_shown = False

    # -------------------------------------------------------------- the stream kfp writes to
    def write(self, text: str) -> int:
        self.partial += ANSI.sub("", text)
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        if self.log:
            self.log.flush()

    def isatty(self) -> bool:
        return False

    def _line(self, line: str) -> None:
        if self.log is None:
            self.pending.append(line)
        else:
            self.log.write(line + "\n")
        if self.log is not self.pipeline_log and PROGRESS.search(line):
            self._progress(line.strip())

    def _progress(self, line: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self.console.write("\r\x1b[K  " + line[:width - 2])
            self.progress_shown = True
        elif STEP_BAR.match(line) and time.monotonic() - self.shown_at >= self.interval:
            self.console.write("  " + line + "\n")
            self.shown_at = time.monotonic()
        self.console.flush()

    def _say(self, text: str) -> None:
        if self.progress_shown:  # the progress line is redrawn in place: clear it first
            self.console.write("\r\x1b[K")
            self.progress_shown = False
        self.console.write(text + "\n")
        self.console.flush()

    # -------------------------------------------------------------- tasks
    def begin(self, run_dir: Path, task: str) -> None:
        if self.logs_dir is None:
            self.logs_dir = run_dir / "logs"
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            self.pipeline_log = open(self.logs_dir / "pipeline.log", "w")
            self.pipeline_log.write("".join(line + "\n" for line in self.pending))
            self.pending = []
        path = self.logs_dir / f"{task}.log"
        self.log = open(path, "a" if task in self.opened else "w")  # "a": a retry of the task
        self.opened.add(task)
        self.shown_at = time.monotonic()
        note = self.started(task)
        self._say(f"{self.label(task)}{'  ' + note if note else ''}  (log: {shown_path(path)})")

    def end(self, run_dir: Path, task: str, seconds: float, ok: bool) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = ""
        path = Path(self.log.name)
        self.log.close()
        self.log = self.pipeline_log
        if ok:
            result = self.finished(run_dir, task)
            self._say(f"{self.label(task)}  done in {seconds:.1f} s{': ' + result if result else ''}")
            return
        tail = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        self._say(f"{self.label(task)}  FAILED after {seconds:.1f} s; the end of {shown_path(path)}:")
        self._say("\n".join("    " + line for line in tail))

    def close(self) -> None:
        if self.partial:
            self._line(self.partial)
        if self.pipeline_log:
            self.pipeline_log.close()
        elif self.pending:  # no task started: what kfp said is the only clue, show it
            self._say("\n".join(self.pending))
        self.log = self.pipeline_log = None


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def quiet_kfp_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in KFP_NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


@contextlib.contextmanager
def routed(console: StepConsole) -> Iterator[StepConsole]:
    """kfp.local's output into ``console`` for the duration: ``sys.stdout``/``sys.stderr`` swapped,
    and kfp.local's per-task function wrapped to call ``console.begin``/``console.end``."""
    from kfp.local import executor_input_utils, status, task_dispatcher

    original = task_dispatcher.run_single_task_implementation
    signature = inspect.signature(original)

    def run_task(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        task = executor_input_utils.get_local_task_resource_name(bound["component_name"])
        run_dir = Path(bound["pipeline_root"]) / bound["pipeline_resource_name"]
        console.begin(run_dir, task)
        t0, ok = time.monotonic(), False
        try:
            outputs, task_status = original(*args, **kwargs)
            ok = task_status == status.Status.SUCCESS
            return outputs, task_status
        finally:
            console.end(run_dir, task, time.monotonic() - t0, ok)

    saved = sys.stdout, sys.stderr
    task_dispatcher.run_single_task_implementation = run_task
    sys.stdout = sys.stderr = console
    try:
        with quiet_kfp_warnings():
            yield console
    finally:
        sys.stdout, sys.stderr = saved
        task_dispatcher.run_single_task_implementation = original
        console.close()


@contextlib.contextmanager
def streamed() -> Iterator[None]:
    """``--verbose``: kfp.local's output as it comes, without colour codes unless on a terminal."""
    saved = sys.stdout, sys.stderr
    if not sys.stdout.isatty():
        sys.stdout = PlainStream(saved[0])
    if not sys.stderr.isatty():
        sys.stderr = PlainStream(saved[1])
    try:
        with quiet_kfp_warnings():
            yield
    finally:
        sys.stdout, sys.stderr = saved
