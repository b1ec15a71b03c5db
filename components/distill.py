"""Component: NEO distillation (torchrun)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(preset: str, overrides: list, dataset: Input[Dataset], teacher: Input[Model],
            student: Input[Model], adapter: Output[Model], metrics: Output[Metrics]):
    """Train the student's LoRA branch on (1-a)*CE + a*T^2*KL(teacher||student) with torchrun.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings.
        dataset: the prepared dataset.
        teacher: teacher model folder.
        student: base student model folder.
        adapter: output folder: adapter/ (lora, neo) or model/ (sft, kd), train_log.jsonl, card.json.
        metrics: final losses and throughput.
    """
    from llmneo.cli import guarded
    from llmneo.config import load_config
    from llmneo.steps import run_distill

    cfg = guarded(load_config, preset, overrides)
    card = guarded(run_distill, cfg, dataset.path, teacher.path, student.path, adapter.path)
    metrics.log_metric("seconds", card["wall_seconds"])
    for key, value in card["final"].items():
        metrics.log_metric(f"final_{key}", value)
    metrics.log_metric("tokens_per_s", card["tokens_per_s"])
    metrics.log_metric("trainable_parameters", card["trainable_parameters"])
    adapter.metadata.update({"method": card["method"], "steps": card["steps"]})
