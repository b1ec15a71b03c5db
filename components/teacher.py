"""Component: teacher loading (and the base student)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def load_teacher(preset: str, overrides: list, dataset: Input[Dataset], teacher: Output[Model],
                 student: Output[Model], metrics: Output[Metrics]):
    """Load and verify the teacher, build or reference the base student, check their tokenizers.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings.
        dataset: the prepared dataset (its tokenizer fingerprint must match the student's).
        teacher: teacher model folder (weights, or a card referencing them; topk/ with teacher.mode=offline).
        student: base student model folder (weights, or a card referencing them).
        metrics: parameter counts, layers; with teacher.mode=offline the top-k cache size and throughput.
    """
    from llmneo.config import load_config
    from llmneo.errors import guarded
    from llmneo.steps import load_teacher as load_teacher_step

    cfg = guarded(load_config, preset, overrides)
    card = guarded(load_teacher_step, cfg, dataset.path, teacher.path, student.path)
    metrics.log_metric("seconds", card["seconds"])
    for role in ("teacher", "student"):
        metrics.log_metric(f"{role}_parameters", card[role]["parameters"])
        metrics.log_metric(f"{role}_layers", card[role]["layers"])
    topk = card["teacher"].get("topk")
    if topk:
        metrics.log_metric("topk_bytes", topk["bytes"])
        metrics.log_metric("topk_positions", topk["tokens"])
        metrics.log_metric("topk_positions_per_second", topk["positions_per_second"])
    teacher.metadata.update({"source": card["teacher"]["source"], "dtype": card["teacher"]["dtype"],
                             "tokenizer_fingerprint": card["teacher"]["tokenizer_fingerprint"]})
    student.metadata.update({"source": card["student"]["source"], "dtype": card["student"]["dtype"]})
