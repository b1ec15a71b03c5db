"""User-facing errors: printed as one line by the CLI and the KFP components, never as a traceback."""


class UserError(Exception):
    """A mistake in the user's input (configuration, data, paths). The message names the field/file/row."""


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type or out-of-range value."""
