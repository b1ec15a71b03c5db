"""What every component does with the run's pipeline parameters (installed in the image as
``llmneo_components.params``; imported inside the component bodies, like llmneo itself).

Configuration precedence, lowest first: the preset named by ``preset`` (a built-in name, or a YAML
file inside the image) — or, when ``config`` is set, that resolved configuration instead (what
``llmneo submit``/``schedule sync`` send, so a local ``--preset mine.yaml`` reaches the pods) —
then the ``overrides``, then the pipeline's own settings for the step (GPU and node counts, the
gate threshold).
"""


def load_run_config(preset: str, overrides: list, config: str = "", settings: list | None = None):
    """The step's validated :class:`llmneo.config.Config`; a mistake exits with one ``error:`` line.
    In a KFP pod, the cache volume (/cache) must be writable first (llmneo.preflight.check_cache_writable)."""
    import os

    from llmneo.errors import guarded

    if os.environ.get(POD_ENV):
        from llmneo.preflight import check_cache_writable

        guarded(check_cache_writable, CACHE_DIR)
    return guarded(_resolve, preset, list(overrides), config, list(settings or []))


def _resolve(preset: str, overrides: list, config: str, settings: list):
    import yaml

    from llmneo.config import load_yaml, read_preset, resolve_config
    from llmneo.errors import UserError

    if config.strip():
        try:
            data = load_yaml(config)
        except yaml.YAMLError as e:
            raise UserError(f"config: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError("config: the resolved configuration must be a YAML mapping")
    else:
        data = read_preset(preset)
    return resolve_config(data, [*overrides, *settings])


def parse_gpus(value: str, name: str = "gpus") -> int:
    """A GPU count from a STRING pipeline parameter (KFP resolves accelerator limits as strings)."""
    from llmneo.errors import guarded

    return guarded(_parse_gpus, value, name)


def _parse_gpus(value, name: str) -> int:
    from llmneo.errors import UserError

    text = str(value).strip()
    if not text.isdigit():
        raise UserError(f"{name}: expected a whole number of GPUs such as \"6\" (or \"0\" for CPU), got {value!r}")
    return int(text)


CACHE_DIR = "/cache"  # the cache volume's mount in the step pods (pipelines/llm_neo.py, images/Dockerfile)
# The launcher env of every KFP v2 task pod (backend/src/v2/compiler/argocompiler/container.go commonEnvs:
# KFP_POD_NAME / KFP_POD_UID from the downward API); kfp.local sets neither.
POD_ENV = "KFP_POD_NAME"


def check_registry_in_pod(uri: str, env: dict | None = None, ismount=None) -> None:
    """Refuse, inside a KFP pod, a registry folder that is on no mounted volume: the pod's own file
    system goes with the pod, so the registration would "succeed" and keep nothing."""
    from llmneo.errors import guarded

    guarded(_check_registry_in_pod, uri, env, ismount)


# register's output when it has nowhere lasting to write (a run started from the UI with its defaults)
REGISTER_SKIPPED = "skipped: no s3 registry"


def registry_lasts(uri: str, env: dict | None = None, ismount=None) -> bool:
    """Whether a registration into ``uri`` outlives this pod (:func:`check_registry_in_pod` passes)."""
    from llmneo.errors import UserError

    try:
        _check_registry_in_pod(uri, env, ismount)
    except UserError:
        return False
    return True


def _check_registry_in_pod(uri: str, env: dict | None, ismount) -> None:
    import os
    from pathlib import Path

    from llmneo.errors import UserError

    env = os.environ if env is None else env
    ismount = ismount or os.path.ismount
    if not env.get(POD_ENV) or ("://" in uri and not uri.startswith("file://")):
        return  # not in a KFP pod, or an object store (s3://)
    path = Path(uri.removeprefix("file://")).absolute()
    if any(ismount(str(p)) for p in [path, *path.parents] if str(p) != "/"):
        return
    raise UserError(f"registry.uri: {uri!r} is a folder inside this pod (on no volume), lost when the pod ends: "
                    f"run with the pipeline parameter registry_uri=s3://BUCKET/PREFIX (or registry.uri=s3://…)")


# Checkpoint folders of other runs unwritten for this long are removed when a distill step starts
# (llmneo.launch.prune_checkpoints; list them with `llmneo prune-checkpoints --dry-run`).
CHECKPOINT_RETENTION_DAYS = 14


def checkpoint_setting(cfg, root: str, run_id: str, shared: bool = False) -> list[str]:
    """The ``distill.checkpoint_uri`` override that keeps the checkpoints on a volume that outlives the
    pod: ``<root>/<run id>/<config fingerprint>`` (a retry of the task in the same run, same
    configuration, finds them), when ``root``'s parent folder exists (the cache volume is mounted),
    the configuration names no location itself, and the run is on one node or ``shared`` (every
    TrainJob node mounts the same volume there: llmneo.cluster.shared_volume_at). Else no override."""
    import os

    if not (root and run_id) or cfg.distill.checkpoint_uri or (cfg.distill.nnodes > 1 and not shared):
        return []
    if not os.path.isdir(os.path.dirname(root.rstrip("/")) or "/"):
        return []
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return [f"distill.checkpoint_uri={root.rstrip('/')}/{safe}/{cfg.fingerprint()}"]
