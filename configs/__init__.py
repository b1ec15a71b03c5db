"""Configuration presets (one YAML file each); see llmneo/config.py.

Folder ``configs/``, imported as ``llmneo_presets`` (the preset ``NAME`` is ``configs/NAME.yaml``);
see docs/architecture.md for the one mapping of all four packages.
"""
