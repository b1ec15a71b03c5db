"""Component: teacher loading (and the base student)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def load_teacher(preset: str, overrides: list, config: str, dataset: Input[Dataset], teacher: Output[Model],
                 student: Output[Model], metrics: Output[Metrics]):
    """Load and verify the teacher, build or reference the base student, check their tokenizers.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings.
        config: the resolved configuration as YAML (replaces the preset when set; see llmneo_components.params).
        dataset: the prepared dataset (its tokenizer fingerprint must match the student's).
        teacher: teacher model folder (weights, or a card referencing them; topk/ with teacher.mode=offline).
        student: base student model folder (weights, or a card referencing them).
        metrics: parameter counts, layers; with teacher.mode=offline the top-k cache size and throughput.
    """
    from llmneo.errors import guarded
    from llmneo.steps import load_teacher as load_teacher_step
    from llmneo_components.params import load_run_config

    cfg = load_run_config(preset, overrides, config)
    cards = guarded(load_teacher_step, cfg, dataset.path, teacher.path, student.path)
    for name, value in cards.step_metrics().items():
        metrics.log_metric(name, value)
    teacher.metadata.update(cards.teacher.metadata())
    student.metadata.update(cards.student.metadata())
