"""Check a run's inputs before its first step: a missing file fails in seconds, not after the
pipeline's retries with back-off.

    preflight(cfg)               # llmneo run: local paths exist and are readable, s3:// URIs well-formed
    preflight(cfg, local=False)  # llmneo submit: local paths live in the image/volumes, not here

What is checked, per input (``data.source``, ``teacher.source``, ``student.source``, ``registry.uri``,
``cluster.staging_uri`` with several nodes):

- ``builtin:NAME``: a dataset shipped with llmneo;
- a local path: it exists and can be read (a file is opened, a folder listed); a model folder has a
  ``config.json``;
- ``s3://bucket/prefix``: well-formed, with a valid bucket name; no network call (credentials and
  objects are checked by the step that reads them);
- ``hf:ID[@REV]``: the id's form only; named sources (``tiny``, ``smollm2``, ``prune``) are built by
  the steps themselves.

:func:`hub_access` decides whether a local run needs the Hugging Face hub at all: offline when every
input is local or packaged, else one probe of the hub (seconds) and one line when it is unreachable.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from llmneo.config import Config
from llmneo.errors import UserError
from llmneo.models import builtin_path, parse_hub_source

NAMED_MODELS = {"teacher.source": ("tiny", "smollm2"), "student.source": ("tiny", "smollm2", "prune")}


def _s3(uri: str, key: str) -> None:
    from llmneo.storage.s3 import parse_uri  # boto3: only when an s3:// input is named

    parse_uri(uri, f"{key}: {uri}")


def _readable(path: Path, key: str, source: str) -> None:
    """Open the file / list the folder: the check the step's first read would do."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        raise UserError(f"{key}: {source}: cannot read ({e.strerror or e})") from None


def check_data_source(source: str, key: str = "data.source", local: bool = True) -> None:
    if source.startswith("builtin:"):
        builtin_path(source.removeprefix("builtin:"))
    elif source.startswith("s3://"):
        _s3(source, key)
    elif source.startswith("hf:"):
        if not source[3:].partition("@")[0]:
            raise UserError(f"{key}: empty dataset id in {source!r} (expected hf:ID[@REVISION])")
    elif local:
        path = Path(source).expanduser()
        if not path.exists():
            hint = (f"; for a Hugging Face dataset write hf:{source}"
                    if source.count("/") == 1 and not source.startswith((".", "/", "~")) else "")
            raise UserError(f"{key}: {source!r} does not exist{hint}")
        _readable(path, key, source)


def check_model_source(source: str, key: str, local: bool = True) -> None:
    if source in NAMED_MODELS.get(key, ()):
        return
    if source.startswith("s3://"):
        _s3(source, key)
    elif source.startswith("hf:"):
        parse_hub_source(source, key)
    elif local:
        path = Path(source).expanduser()
        if not path.is_dir():
            hint = (f"; for a Hugging Face model write hf:{source}"
                    if source.count("/") == 1 and not path.exists() and not source.startswith((".", "/", "~")) else "")
            raise UserError(f"{key}: {source!r} is not a model folder{hint}")
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: {source!r} is not a Hugging Face model folder (no config.json)")
        _readable(path / "config.json", key, source)


def preflight(cfg: Config, local: bool = True) -> None:
    """Raise a one-line :class:`UserError` for the first input of ``cfg`` that cannot be used.
    ``local=False`` (a run submitted to a cluster) skips local paths: they are the pods' paths."""
    check_data_source(cfg.data.source, local=local)
    check_model_source(cfg.teacher.source, "teacher.source", local=local)
    check_model_source(cfg.student.source, "student.source", local=local)
    registry = cfg.registry.uri
    if registry.startswith("s3://"):
        _s3(registry, "registry.uri")
    elif local and Path(registry).expanduser().exists() and not Path(registry).expanduser().is_dir():
        raise UserError(f"registry.uri: {registry} is a file, not a folder")
    if cfg.distill.nnodes > 1 and cfg.cluster.staging_uri.startswith("s3://"):
        _s3(cfg.cluster.staging_uri, "cluster.staging_uri")


# The GPUs a step was given (the pipeline's distill_gpus), exported by the distill step to its torchrun.
GPUS_ENV = "LLMNEO_GPUS"
DRIVER_DIRS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib")  # GKE's device plugin mount


@contextlib.contextmanager
def requested_gpus(n: int):
    """``$LLMNEO_GPUS`` = n (n > 0) for the duration of the block, for the torchrun processes a step
    starts; the caller's environment is restored afterwards."""
    if n <= 0:
        yield
        return
    before = os.environ.get(GPUS_ENV)
    os.environ[GPUS_ENV] = str(n)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GPUS_ENV, None)
        else:
            os.environ[GPUS_ENV] = before


def check_gpus(env: dict | None = None, device_count=None) -> None:
    """Refuse to train on fewer GPUs than requested, in one line naming what this process sees: with
    ``$LLMNEO_GPUS`` > 0 (GPUs were requested) the node must show at least that many CUDA devices, and
    with CUDA devices at all, at least one per local process (``$LOCAL_WORLD_SIZE``). Never a silent
    CPU/gloo fallback of a GPU job."""
    env = os.environ if env is None else env
    wanted = int(env.get(GPUS_ENV) or 0)
    local = int(env.get("LOCAL_WORLD_SIZE") or 1)
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count
    visible = device_count()
    if wanted <= 0 and visible == 0:
        return  # a CPU run, as asked
    need = max(wanted, local)
    if visible >= need:
        return
    drivers = [d for d in DRIVER_DIRS if os.path.isdir(d)]
    raise UserError(f"distill: {need} GPUs needed ({GPUS_ENV}={wanted}, {local} processes on this node) but "
                    f"torch.cuda.device_count() = {visible}; CUDA_VISIBLE_DEVICES="
                    f"{env.get('CUDA_VISIBLE_DEVICES', '(unset)')}, driver folder "
                    f"{drivers[0] if drivers else 'none of ' + ', '.join(DRIVER_DIRS)}, LD_LIBRARY_PATH="
                    f"{env.get('LD_LIBRARY_PATH', '(unset)')}: check the pod's nvidia.com/gpu limit and the "
                    f"node's NVIDIA device plugin")


def check_cache_writable(folder: str = "/cache") -> None:
    """Refuse in one line a mounted cache volume this process cannot write (a KFP step pod runs as the
    image's uid 1000 with no fsGroup): the teacher download or a checkpoint would fail hours later."""
    import tempfile

    if not os.path.isdir(folder):
        return
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".llmneo-write-check-"):
            pass
    except OSError as e:
        st = os.stat(folder)
        raise UserError(f"{folder}: the cache volume (PVC llmneo-cache) is not writable by uid {os.geteuid()} "
                        f"(owner {st.st_uid}:{st.st_gid}, mode {st.st_mode & 0o7777:o}; {e.strerror}): run the "
                        f"one-shot Job in k8s/cache-owner, or export the volume owned by 1000") from None


# --------------------------------------------------------------------------------------------
# The Hugging Face hub: needed at all, and reachable?
# --------------------------------------------------------------------------------------------

HUB_PROBE_SECONDS = 5.0
DEFAULT_HUB = "https://huggingface.co"


def hub_inputs(cfg: Config) -> list[str]:
    """The inputs of ``cfg`` that come from the Hugging Face hub, as ``key=value``: ``hf:`` data and
    model sources, and lm-eval tasks that are not llmneo's own (their datasets are on the hub)."""
    from llmneo.task_index import local_task_names

    needed = [f"{key}={value}" for key, value in (("data.source", cfg.data.source),
                                                  ("teacher.source", cfg.teacher.source),
                                                  ("student.source", cfg.student.source))
              if value.startswith("hf:")]
    hub_tasks = [t for t in cfg.eval.lm_eval_tasks if t not in local_task_names()]
    if hub_tasks:
        needed.append(f"eval.lm_eval_tasks={','.join(hub_tasks)}")
    return needed


def _offline_set() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """None when ``endpoint`` answers (any HTTP status), else why not (one short phrase). One request,
    no retries."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return str(reason).strip() or type(e).__name__
    return None


def hub_access(cfg: Config) -> None:
    """Set offline mode (``HF_HUB_OFFLINE=1``, for this process and the steps it starts) when no input
    needs the hub. When one does — and the user did not ask for offline mode, which uses the local
    Hugging Face cache only — probe the hub once and raise a one-line :class:`UserError` naming the
    inputs when it is unreachable, instead of each step retrying downloads for minutes."""
    needed = hub_inputs(cfg)
    if not needed:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return
    if _offline_set():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_HUB
    why = hub_unreachable(endpoint)
    if why:
        raise UserError(f"{'; '.join(needed)}: needs the Hugging Face hub, and {endpoint} is unreachable ({why}); "
                        f"check the network or proxy (HTTPS_PROXY), or set HF_HUB_OFFLINE=1 to use only the "
                        f"local Hugging Face cache")
