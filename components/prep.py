"""Component: data prep."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prep_data(preset: str, overrides: list, config: str, answers: Input[Dataset], dataset: Output[Dataset],
              metrics: Output[Metrics]):
    """Tokenize the configured data into train/val Parquet with response-only labels.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings, e.g. ["data.limit=10000"].
        config: the resolved configuration as YAML (replaces the preset when set; see llmneo_components.params).
        answers: the generate step's folder (the teacher's answers, read instead of data.source unless data.answers=given).
        dataset: output folder with train.parquet, val.parquet, rejects.jsonl, card.json, length_histogram.png.
        metrics: row counts (read/kept/rejected, rejected per reason), token statistics, throughput.
    """
    from llmneo.errors import guarded
    from llmneo.steps import prepare_dataset
    from llmneo_components.params import load_run_config

    cfg = load_run_config(preset, overrides, config)
    card = guarded(prepare_dataset, cfg, dataset.path, answers.path)
    for name, value in card.step_metrics().items():
        metrics.log_metric(name, value)
    dataset.metadata.update(card.metadata())
