"""Component: data prep."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prep_data(preset: str, overrides: list, dataset: Output[Dataset], metrics: Output[Metrics]):
    """Tokenize the configured data into train/val Parquet with response-only labels.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings, e.g. ["data.limit=10000"].
        dataset: output folder with train.parquet, val.parquet, rejects.jsonl, card.json, length_histogram.png.
        metrics: row counts (read/kept/rejected, rejected per reason), token statistics, throughput.
    """
    from llmneo.config import load_config
    from llmneo.errors import guarded
    from llmneo.steps import prepare_dataset

    cfg = guarded(load_config, preset, overrides)
    card = guarded(prepare_dataset, cfg, dataset.path)
    metrics.log_metric("seconds", card["seconds"])
    metrics.log_metric("rows_per_second", card["rows_per_second"])
    for key, value in card["counts"].items():
        metrics.log_metric(f"rows_{key}", value)
    for kind, value in card["rejected_by_kind"].items():
        metrics.log_metric(f"rejected_{kind}", value)
    tokens = card["tokens"]
    for key in ("total", "label_tokens", "mean_length", "p50_length", "p99_length", "max_length", "truncated"):
        metrics.log_metric(f"tokens_{key}", tokens[key])
    dataset.metadata.update({"dataset_hash": card["dataset_hash"], "source": card["source"],
                             "content_hash": card["content_hash"],
                             "tokenizer_fingerprint": card["tokenizer_fingerprint"]})
