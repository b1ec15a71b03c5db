"""The trainer's launch contract, in one place: its work folder, its torchrun command, its environment
and the wait for it.

    write_workdir(out, cfg, TrainerInputs(dataset, teacher, student))   # config.yaml + inputs.json
    cmd = torchrun_command(cfg, out)                                     # one node: --standalone
    cmd = torchrun_command(cfg, out, Rendezvous(node_rank, addr, port))  # one of distill.nnodes nodes
    with output_lock(out) as lock:                                       # one writer per output folder
        returncode = run_forwarding_signals(cmd, launch_env(cfg), hold=lock)

The launcher's children die with it: torchrun gets SIGTERM when the launcher dies (even by kill -9;
Linux parent-death signal), passes it to the trainers, which checkpoint and stop; a trainer whose
torchrun dies gets SIGKILL (:func:`die_with_parent`). The lock (``flock`` on a file in the output
folder, held by the launcher and by torchrun) makes a second run into the same folder refuse with
"in use by pid N" while any of them lives.

The work folder holds the resolved configuration (``config.yaml``) and the three input folders
(``inputs.json``); :func:`write_workdir` is the only code that writes them and :func:`read_workdir`
the only code that reads them (``DistillTrainer.from_workdir``, the torchrun entry point). The local
distill step (:func:`llmneo.steps.distill_student`), each multi-node training node
(:func:`llmneo.cluster.run_node`), the tests and the benchmark all go through here.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from llmneo.config import Config, config_from_dict, dump_yaml
from llmneo.errors import UserError

CONFIG_FILE, INPUTS_FILE = "config.yaml", "inputs.json"
TRAINER_MODULE = "llmneo.trainer"
TORCHRUN_MODULE = "llmneo.torchrun"  # torchrun, quiet about a trainer that failed (it said why)
LOCK_FILE = ".llmneo-distill.lock"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# "3/5 distill": which step of the pipeline the trainer runs in, for its progress bar (set by the
# step's launcher; the trainer alone shows "distill[<method>]")
STEP_LABEL_ENV = "LLMNEO_STEP_LABEL"
# where the trainer (rank 0) writes its one-line error instead of printing it, when its launcher
# reports it (the launcher's own line would say it twice)
TRAINER_ERROR_ENV, TRAINER_ERROR_FILE = "LLMNEO_TRAINER_ERROR_FILE", "trainer-error.txt"


def report_error(message: str) -> None:
    """The trainer's one-line error: into the launcher's file (:data:`TRAINER_ERROR_ENV`), else stderr."""
    path = os.environ.get(TRAINER_ERROR_ENV)
    if path:
        try:
            Path(path).write_text(message + "\n")
            return
        except OSError:  # a full disk, say: print it instead
            pass
    print(f"error: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrainerInputs:
    """The trainer's three input folders: the prepared dataset, the teacher step's teacher folder
    (with ``topk/`` when ``teacher.mode=offline``) and the base student."""

    dataset: str
    teacher: str
    student: str

    @classmethod
    def of(cls, dataset: str | Path, teacher: str | Path, student: str | Path) -> TrainerInputs:
        """Absolute paths: torchrun's processes may start in another working directory."""
        return cls(*(str(Path(p).resolve()) for p in (dataset, teacher, student)))


@dataclass(frozen=True)
class Rendezvous:
    """Where a multi-node torchrun finds its peers (static rendezvous on node 0)."""

    node_rank: int
    master_addr: str
    master_port: int


def write_workdir(workdir: str | Path, cfg: Config, inputs: TrainerInputs) -> Path:
    """Create ``workdir`` with the trainer's ``config.yaml`` and ``inputs.json``; returns it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(dump_yaml(cfg))
    (workdir / INPUTS_FILE).write_text(json.dumps(asdict(inputs), indent=2))
    return workdir


def read_workdir(workdir: str | Path) -> tuple[Config, TrainerInputs]:
    """The configuration and inputs that :func:`write_workdir` wrote."""
    workdir = Path(workdir)
    try:
        data = yaml.safe_load((workdir / CONFIG_FILE).read_text())
        inputs = json.loads((workdir / INPUTS_FILE).read_text())
    except FileNotFoundError as e:
        raise UserError(f"{workdir}: no {Path(e.filename).name}; the trainer's work folder is written by "
                        f"llmneo.launch.write_workdir (llmneo distill)") from None
    return config_from_dict(data), TrainerInputs(**inputs)


def torchrun_command(cfg: Config, workdir: str | Path, rendezvous: Rendezvous | None = None) -> list[str]:
    """torchrun running the trainer on ``workdir``: ``distill.nproc_per_node`` processes on this node;
    without ``rendezvous`` a standalone single-node run, with it one node of ``distill.nnodes``."""
    d = cfg.distill
    cmd = [sys.executable, "-m", TORCHRUN_MODULE]
    if rendezvous is None:
        cmd += ["--standalone", f"--nnodes={d.nnodes}", f"--nproc-per-node={d.nproc_per_node}"]
    else:
        cmd += [f"--nnodes={d.nnodes}", f"--nproc-per-node={d.nproc_per_node}",
                f"--node-rank={rendezvous.node_rank}", f"--master-addr={rendezvous.master_addr}",
                f"--master-port={rendezvous.master_port}"]
    return cmd + ["-m", TRAINER_MODULE, "--workdir", str(workdir)]


def launch_env(cfg: Config, base: dict | None = None, step_label: str | None = None) -> dict:
    """The trainer's environment: ``base`` (default: this process's) plus an ``OMP_NUM_THREADS`` that
    shares this machine's cores among the node's processes, unless one is set already, and
    ``step_label`` (e.g. ``3/5 distill``) for its progress bar."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.distill.nproc_per_node)))
    if step_label:
        env[STEP_LABEL_ENV] = step_label
    return env


def die_with_parent(signum: int, parent: int | None = None) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
    if the parent is already gone (it is no longer ``parent``), send it now. False where unsupported.
    Async-signal-safe enough for a ``preexec_fn``: no allocation beyond the ctypes call."""
    if _LIBC is None:
        return False
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # the parent died before the prctl
        os.kill(os.getpid(), signum)
    return True


@contextmanager
def output_lock(folder: str | Path) -> Iterator[int]:
    """Hold an exclusive lock on ``folder`` (created if needed) while the block runs; yields the lock's
    file descriptor (pass it to :func:`run_forwarding_signals` as ``hold`` so that the child keeps the
    folder locked as long as it lives). A folder locked by another process raises a one-line
    :class:`UserError` naming its pid. The kernel drops the lock when its holders exit, however."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(_lock_message(folder, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock unless a child still holds it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie is dead, only not yet reaped
        return not stat.read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _lock_holders(lock: Path) -> list[int]:
    """The live processes (but this one) with ``lock`` open: who holds the flock (Linux /proc)."""
    target, holders = str(lock.resolve()), []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                holders.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return sorted(holders)


def _lock_message(folder: Path, recorded: str) -> str:
    """Who holds the output lock. The file records the launcher that took it; when that one is gone,
    the lock is held by a process it started (a trainer still checkpointing, or left over): name it."""
    if recorded.isdigit() and not _alive(int(recorded)):
        holders = _lock_holders(folder / LOCK_FILE)
        pids = ", ".join(map(str, holders)) or "unknown"
        return (f"{folder}: in use by pid {pids} (left by an llmneo distill whose launcher, pid {recorded}, is "
                f"gone); wait for it to finish or stop it, or use another output folder")
    return (f"{folder}: in use by pid {recorded} (another llmneo distill writes it); wait for it to finish or use "
            f"another output folder")


def run_forwarding_signals(cmd: list[str], env: dict, hold: int | None = None) -> int:
    """Run ``cmd`` and wait for it. A SIGTERM received here (Kubernetes preempting the pod) is passed
    on to it — torchrun passes it to the trainers, which checkpoint and stop — instead of killing us
    and orphaning it; if we die anyway (kill -9), the child gets SIGTERM from the kernel. Ctrl-C
    already reaches the child through the terminal's process group, so SIGINT is only kept from
    interrupting the wait. ``hold``: a file descriptor (the output folder's lock) the child inherits."""
    proc = subprocess.Popen(cmd, env=env, pass_fds=() if hold is None else (hold,),
                            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM, os.getpid()))
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()

    def forward(signum, _frame):
        if proc.poll() is None and signum == signal.SIGTERM:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def checkpoint_root(cfg: Config, workdir: str | Path) -> Path:
    """``distill.checkpoint_uri`` (a folder that outlives the step's pod), else ``checkpoint/`` in the
    work folder (a KFP output folder is a per-pod emptyDir: a retried pod would start from step 0)."""
    return Path(cfg.distill.checkpoint_uri) if cfg.distill.checkpoint_uri else Path(workdir) / "checkpoint"


@dataclass(frozen=True)
class StaleCheckpoints:
    """One run's checkpoint folder under the checkpoint root, last written ``age_days`` ago."""

    path: Path
    age_days: float
    size_bytes: int


def stale_checkpoints(root: str | Path, max_age_days: float, keep: str | Path | None = None,
                      now: float | None = None) -> list[StaleCheckpoints]:
    """The run folders directly under ``root`` (``<root>/<run>/<config fingerprint>/…``, the pipeline's
    one-node checkpoints) in which nothing was written for more than ``max_age_days``: runs that failed
    for good (a successful run removes its own). ``keep``: a folder never listed (the current run's).
    Symbolic links are neither followed nor listed."""
    import time

    root, now = Path(root), time.time() if now is None else now
    keep = Path(keep).resolve() if keep else None
    found = []
    if not root.is_dir():
        return found
    for run in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if keep is not None and (run.resolve() == keep or run.resolve() in keep.parents):
            continue
        newest, size = run.lstat().st_mtime, 0
        for dirpath, _dirs, files in os.walk(run):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                newest, size = max(newest, st.st_mtime), size + st.st_size
        age = (now - newest) / 86400
        if age > max_age_days:
            found.append(StaleCheckpoints(run, age, size))
    return found


def prune_checkpoints(root: str | Path, max_age_days: float, keep: str | Path | None = None,
                      dry_run: bool = False, log=print) -> list[StaleCheckpoints]:
    """Remove (or with ``dry_run`` only list) :func:`stale_checkpoints`, one line each."""
    import shutil

    stale = stale_checkpoints(root, max_age_days, keep)
    for s in stale:
        log(f"{'would remove' if dry_run else 'removing'} {s.path} ({s.size_bytes / 2**30:.2f} GiB, "
            f"last written {s.age_days:.1f} days ago)")
        if not dry_run:
            shutil.rmtree(s.path, ignore_errors=True)
    return stale
