"""What every component does with the run's pipeline parameters (installed in the image as
``llmneo_components.params``; imported inside the component bodies, like llmneo itself).

Configuration precedence, lowest first: the preset named by ``preset`` (a built-in name, or a YAML
file inside the image) — or, when ``config`` is set, that resolved configuration instead (what
``llmneo submit``/``schedule sync`` send, so a local ``--preset mine.yaml`` reaches the pods) —
then the ``overrides``, then the pipeline's own settings for the step (GPU and node counts, the
gate threshold).
"""


def load_run_config(preset: str, overrides: list, config: str = "", settings: list | None = None):
    """The step's validated :class:`llmneo.config.Config`; a mistake exits with one ``error:`` line."""
    from llmneo.errors import guarded

    return guarded(_resolve, preset, list(overrides), config, list(settings or []))


def _resolve(preset: str, overrides: list, config: str, settings: list):
    import yaml

    from llmneo.config import read_preset, resolve_config
    from llmneo.errors import UserError

    if config.strip():
        try:
            data = yaml.safe_load(config)
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
