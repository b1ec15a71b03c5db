"""Configuration presets (installed as ``llmneo_presets``); see llmneo/config.py."""
