"""The trainer's launch contract (llmneo/launch.py): work folder round trip, the one torchrun builder
(single node and one of several), the OMP_NUM_THREADS rule, SIGTERM forwarded to the child."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.launch import (
    Rendezvous,
    TrainerInputs,
    launch_env,
    read_workdir,
    run_forwarding_signals,
    torchrun_command,
    write_workdir,
)


def test_workdir_round_trip_with_absolute_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["distill.alpha=0.3"])
    out = write_workdir(tmp_path / "w", cfg, TrainerInputs.of("d", "t", "s"))
    again, inputs = read_workdir(out)
    assert again == cfg
    assert inputs == TrainerInputs(str(tmp_path / "d"), str(tmp_path / "t"), str(tmp_path / "s"))


def test_a_folder_without_the_contract_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no config.yaml") as info:
        read_workdir(tmp_path)
    assert "\n" not in str(info.value)


def test_one_torchrun_builder_for_one_node_and_for_several(tmp_path):
    one = torchrun_command(load_config("tiny", ["distill.nproc_per_node=3"]), tmp_path)
    assert one == [sys.executable, "-m", "llmneo.torchrun", "--standalone", "--nnodes=1",
                   "--nproc-per-node=3", "-m", "llmneo.trainer", "--workdir", str(tmp_path)]
    cfg = load_config("tiny", ["distill.nnodes=2", "distill.nproc_per_node=4"])
    node = torchrun_command(cfg, tmp_path, Rendezvous(1, "10.0.0.7", 29500))
    assert node == [sys.executable, "-m", "llmneo.torchrun", "--nnodes=2", "--nproc-per-node=4",
                    "--node-rank=1", "--master-addr=10.0.0.7", "--master-port=29500", "-m", "llmneo.trainer",
                    "--workdir", str(tmp_path)]


def test_omp_threads_share_the_cores_unless_set(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cfg = load_config("tiny", ["distill.nproc_per_node=3"])
    assert launch_env(cfg, {})["OMP_NUM_THREADS"] == "5"
    assert launch_env(cfg, {"OMP_NUM_THREADS": "2", "X": "1"}) == {"OMP_NUM_THREADS": "2", "X": "1"}
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert launch_env(cfg, {})["OMP_NUM_THREADS"] == "1"


def test_sigterm_is_forwarded_to_the_child(tmp_path):
    """The child sees SIGTERM (and reports it), the parent survives and returns its exit code."""
    marker = tmp_path / "ready"
    child = ("import signal, sys, time, pathlib\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
             f"pathlib.Path({str(marker)!r}).touch()\n"
             "time.sleep(60)\n")
    def kill_when_ready():
        for _ in range(600):
            if marker.exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_when_ready, daemon=True).start()
    t0 = time.time()
    assert run_forwarding_signals([sys.executable, "-c", child], dict(os.environ)) == 143
    assert time.time() - t0 < 30
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored


def test_the_output_lock_refuses_a_second_holder_with_its_pid(tmp_path):
    from llmneo.launch import LOCK_FILE, output_lock

    with output_lock(tmp_path / "out"):
        with pytest.raises(UserError, match=rf"out: in use by pid {os.getpid()} ") as info:
            with output_lock(tmp_path / "out"):
                pass
        assert "\n" not in str(info.value)
    with output_lock(tmp_path / "out"):  # released on exit
        assert (tmp_path / "out" / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_lock_left_to_a_child_of_a_dead_launcher_names_the_living_holder(tmp_path):
    """The launcher that wrote its pid into the lock file is gone, but a child that inherited the
    lock still holds it: the message says the launcher is gone and names the process that holds it."""
    import subprocess

    from llmneo.launch import output_lock

    launcher = ("import subprocess, sys\n"
                "from llmneo.launch import output_lock\n"
                f"with output_lock({str(tmp_path / 'out')!r}) as lock:\n"
                "    child = subprocess.Popen(['sleep', '120'], pass_fds=(lock,), start_new_session=True,\n"
                "                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                "    print(child.pid, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=120, check=True)
    child = int(done.stdout.split()[0])
    try:
        with pytest.raises(UserError) as info:
            with output_lock(tmp_path / "out"):
                pass
        message = str(info.value)
        assert "\n" not in message
        assert f"in use by pid {child}" in message, message
        assert f"pid {done.stdout.split()[0]}" in message and "is gone" in message, message
    finally:
        os.kill(child, signal.SIGKILL)
    for _ in range(200):  # the kernel releases the lock once the child is dead
        try:
            with output_lock(tmp_path / "out"):
                break
        except UserError:
            time.sleep(0.05)
    else:
        raise AssertionError("the lock stayed held after its holder died")


def test_a_child_dies_with_a_launcher_killed_by_sigkill(tmp_path):
    """The launcher's child gets SIGTERM from the kernel when the launcher is kill -9'd, and holds the
    lock it inherited until then."""
    import subprocess

    pid_file = tmp_path / "child.pid"
    child = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)"
    launcher = ("import os, sys\n"
                "from llmneo.launch import output_lock, run_forwarding_signals\n"
                f"with output_lock({str(tmp_path / 'out')!r}) as lock:\n"
                f"    run_forwarding_signals([sys.executable, '-c', {child!r}], dict(os.environ), hold=lock)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        proc.kill()
        proc.wait(timeout=30)
        for _ in range(200):
            try:
                os.kill(child_pid, 0)
            except ProcessLookupError:
                break
            stat = Path(f"/proc/{child_pid}/stat")
            if stat.is_file() and stat.read_text().split(") ")[1].startswith("Z"):
                break  # a zombie: dead, waiting for init to reap it
            time.sleep(0.05)
        else:
            os.kill(child_pid, signal.SIGKILL)
            pytest.fail("the child outlived its launcher")
    finally:
        if proc.poll() is None:
            proc.kill()
