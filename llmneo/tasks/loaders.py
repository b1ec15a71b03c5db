"""Datasets of the repo's lm-eval tasks (referenced as ``!function loaders.NAME`` by the YAMLs here).

lm-eval calls them with the task metadata as keyword arguments (``TaskManager(metadata=...)``), so
they work offline: no hub download, only files in this folder or the one named by the metadata.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mc_questions(**_metadata):
    """The project's multiple-choice set: question, choices (4), answer (index)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_read_jsonl(HERE / "llmneo_mc.jsonl"))})


def val_texts(llmneo_val_jsonl: str | None = None, **_metadata):
    """The val split as ``{"text": ...}`` rows, from the JSONL that llmneo.evaluate exports."""
    import datasets

    if not llmneo_val_jsonl:
        raise ValueError("llmneo_val_ppl needs the task metadata llmneo_val_jsonl (run it through llmneo.evaluate)")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_read_jsonl(Path(llmneo_val_jsonl)))})
