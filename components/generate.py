"""Component: the teacher writes the answers (data.answers=missing|teacher)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def generate_answers(preset: str, overrides: list, config: str, answers: Output[Dataset], metrics: Output[Metrics]):
    """Answer prompt-only records with the teacher (with data.answers=given: only a card saying so).

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings, e.g. ["data.answers=teacher"].
        config: the resolved configuration as YAML (replaces the preset when set; see llmneo_components.params).
        answers: output folder with answers.jsonl, rejects.jsonl and card.json (teacher fingerprint, generation parameters).
        metrics: records answered/rejected (per reason), answers and tokens generated, prompts/s, tokens/s, shards reused.
    """
    from llmneo.errors import guarded
    from llmneo.steps import generate_answers as generate_step
    from llmneo_components.params import load_run_config

    cfg = load_run_config(preset, overrides, config)
    card = guarded(generate_step, cfg, answers.path)
    for name, value in card.step_metrics().items():
        metrics.log_metric(name, value)
    answers.metadata.update(card.metadata())
