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
    from llmneo.cli import guarded
    from llmneo.config import load_config
    from llmneo.steps import run_prep

    cfg = guarded(load_config, preset, overrides)
    card = guarded(run_prep, cfg, dataset.path)
    for name, value in card.step_metrics().items():
        metrics.log_metric(name, value)
    dataset.metadata.update(card.metadata())
