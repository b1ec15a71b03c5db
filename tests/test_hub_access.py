"""`llmneo run` and the Hugging Face hub: offline mode only when every input is local or packaged (the
README's `hf:` examples download), and one line within seconds when a download is needed but the hub
does not answer — not the steps' download retries."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.preflight import hub_access, hub_inputs

OFFLINE_KEYS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def online(monkeypatch):
    """The user's shell: no offline variables (tests/conftest.py sets them for every other test)."""
    for key in OFFLINE_KEYS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def answering_hub():
    """A loopback HTTP server standing in for the hub's endpoint: it answers every request with 404."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_inputs():
    assert hub_inputs(load_config("tiny")) == []
    assert hub_inputs(load_config("tiny", ["data.source=hf:org/data", "teacher.source=hf:org/m@v1",
                                           "eval.lm_eval_tasks=[llmneo_mc,arc_easy]"])) == [
        "data.source=hf:org/data", "teacher.source=hf:org/m@v1", "eval.lm_eval_tasks=arc_easy"]


def test_local_inputs_run_offline(online):
    hub_access(load_config("tiny"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_hub_inputs_stay_online_when_the_hub_answers(online, monkeypatch, answering_hub):
    monkeypatch.setenv("HF_ENDPOINT", answering_hub)
    hub_access(load_config("tiny", ["data.source=hf:org/data"]))
    assert "HF_HUB_OFFLINE" not in os.environ


def test_unreachable_hub_is_one_line(online, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(UserError) as e:
        hub_access(load_config("tiny", ["teacher.source=hf:org/model"]))
    assert str(e.value).startswith(f"teacher.source=hf:org/model: needs the Hugging Face hub, and {endpoint} is "
                                   f"unreachable (")
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "\n" not in str(e.value)
    # the user's own offline mode means "use the local cache": no probe, no error
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_access(load_config("tiny", ["teacher.source=hf:org/model"]))


def test_llmneo_run_with_an_hf_source_and_no_hub_says_so_in_one_line(tmp_path):
    """The whole command, as a user runs it (no offline variables): the data source is on the hub, the
    hub's endpoint refuses connections. Before, `llmneo run` forced offline mode and the data step
    failed (after its retries) with "offline mode is on"."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_KEYS}
    env["HF_ENDPOINT"] = endpoint = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "run", "--preset", "tiny",
                           "--pipeline-root", str(tmp_path / "kfp"), f"registry.uri={tmp_path / 'registry'}",
                           "data.source=hf:HuggingFaceH4/no_robots"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: data.source=hf:HuggingFaceH4/no_robots: needs the Hugging Face hub, and "
                               f"{endpoint} is unreachable"), lines[0]
    assert not (tmp_path / "kfp").exists()  # refused before any step ran
    print(f"refused in {seconds:.1f}s")
