"""``llmneo run --runner containers``: every step in the project's own images (kfp.local DockerRunner).

    make images                                     # llmneo/llmneo and llmneo/llmneo-cpu (Docker or podman)
    llmneo run --runner containers --preset tiny data.source=s3://b/data registry.uri=s3://b/registry

The engine is Docker, or podman through its Docker-compatible socket (started here when DOCKER_HOST is
unset and podman is installed). The containers share one host path with this machine, the pipeline
root (kfp.local bind-mounts it for the artifacts); everything else a step reads or writes goes
through S3 exactly like on a cluster, so the registry must be ``s3://`` and the data S3, ``hf:`` or
``builtin:``. Steps see the S3/hub credentials of this shell (the variables of the cluster secrets)
and the host network (an S3 endpoint on loopback works), and run as this user so the artifacts stay
writable and owned by you.

kfp.local (2.17) starts each container with auto-remove and treats "container not found" from
``wait()`` as exit code 0; with podman the container is usually gone by then, so a failed step
would be reported as a success. ``install()`` replaces that function: no auto-remove, the real exit
code, then the container and its anonymous volumes (the images' ``VOLUME /cache``) are removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmneo.cluster import SECRET_ENV
from llmneo.errors import UserError

PODMAN_IDLE_S = 600  # the socket service started here exits after this long without a request
_RUN: dict = {"environment": {}, "args": {}}


def check_config(cfg) -> None:
    """Refuse what would silently keep or find nothing inside a container (only the pipeline root is shared)."""
    if not cfg.registry.uri.startswith("s3://"):
        raise UserError(f"registry.uri={cfg.registry.uri!r}: --runner containers needs an s3:// registry "
                        "(a path inside a container is lost when the step ends)")
    source = cfg.data.source
    if not source.startswith(("s3://", "hf:", "builtin:")):
        raise UserError(f"data.source={source!r}: --runner containers reads data from s3://, hf: or builtin: "
                        "(host paths are not mounted into the containers)")


def _ping(client_factory) -> bool:
    try:
        client = client_factory()
        client.ping()
        client.close()
        return True
    except Exception:
        return False


def ensure_engine() -> str:
    """DOCKER_HOST for docker-py: the one set, a running Docker, or a podman socket started here."""
    import docker

    if os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists():
        if _ping(docker.from_env):
            return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        if os.environ.get("DOCKER_HOST"):
            raise UserError(f"DOCKER_HOST={os.environ['DOCKER_HOST']}: no container engine answers there")
    if shutil.which("podman") is None:
        raise UserError("--runner containers: no container engine (no running Docker, no podman); "
                        "see README 'Run in containers'")
    runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    host = f"unix://{runtime / f'llmneo-podman-{os.getuid()}.sock'}"
    os.environ["DOCKER_HOST"] = host
    if not _ping(docker.from_env):
        subprocess.Popen(["podman", "system", "service", f"--time={PODMAN_IDLE_S}", host],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 30
        while not _ping(docker.from_env):
            if time.time() > deadline:
                raise UserError(f"podman system service did not answer on {host} within 30 s")
            time.sleep(0.2)
    return host


def check_images(images: list[str]) -> None:
    import docker

    client = docker.from_env()
    try:
        for image in images:
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                raise UserError(f"image {image} not found: build it with `make images` "
                                "(or set LLMNEO_IMAGE / LLMNEO_CPU_IMAGE)") from None
    finally:
        client.close()


def run_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """kfp.local's run_docker_container, minus auto-remove and the assumed success (see module doc)."""
    environment = {**_RUN["environment"], **(run_args.pop("environment", None) or {})}
    container = client.containers.run(image=image, command=command, detach=True, volumes=volumes,
                                      environment=environment, auto_remove=False,
                                      **{**_RUN["args"], **run_args})
    try:
        shown = bytearray()
        for chunk in container.logs(stream=True, follow=True):
            shown += chunk
            _show(chunk)
        code = int(container.wait()["StatusCode"])
        # a followed log can end before the container's last output was read (podman's compat API on
        # a container that exits right after writing): after the exit the whole log is there
        full = container.logs(stream=False, follow=False)
        if full.startswith(bytes(shown)):
            _show(full[len(shown):])
        elif full:  # the stream and the log disagree (split differently?): show the complete log
            _show(b"--- complete log of the step ---\n" + full)
        return code
    finally:
        container.remove(v=True, force=True)


def _show(data: bytes) -> None:
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()


def install(pipeline_root: Path) -> None:
    """Route kfp.local's DockerRunner through :func:`run_container` with this run's environment."""
    from kfp.local import docker_task_handler

    cache = pipeline_root / ".cache"  # inside the one shared path: hub downloads survive between steps
    cache.mkdir(parents=True, exist_ok=True)
    env = {key: os.environ[key] for keys in SECRET_ENV.values() for key in keys if key in os.environ}
    env.update({key: os.environ[key] for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                  "AWS_EC2_METADATA_DISABLED") if key in os.environ})
    env.update({"HOME": "/tmp", "HF_HOME": str(cache / "hf"), "LLMNEO_CACHE": str(cache / "llmneo")})
    _RUN["environment"] = env
    # this user (artifacts writable and owned by the caller), host network (S3 on loopback), room for
    # torchrun's shared memory
    _RUN["args"] = {"user": f"{os.getuid()}:{os.getgid()}", "network_mode": "host", "shm_size": "1g"}
    docker_task_handler.run_docker_container = run_container
