"""Component: merge the adapter and evaluate."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_eval(preset: str, overrides: list, max_kl_to_teacher: float, dataset: Input[Dataset],
               teacher: Input[Model], student: Input[Model], adapter: Input[Model], model: Output[Model],
               metrics: Output[Metrics], report: Output[Markdown]) -> str:
    """Merge the LoRA adapter into the base student, evaluate fidelity to the teacher, apply the gate.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings.
        max_kl_to_teacher: gate threshold on KL(teacher||student) over the val split.
        dataset: the prepared dataset (val split).
        teacher: teacher model folder.
        student: base student model folder.
        adapter: distill output folder.
        model: merged Hugging Face model folder with eval.json, report.md and README model card.
        metrics: fidelity of the distilled student (KL, top-1 agreement, perplexity).
        report: Markdown report (comparison table, loss curve data).

    Returns:
        "pass" or "fail": the registration gate (all configured thresholds hold).
    """
    import shutil

    from llmneo.cli import guarded
    from llmneo.config import load_config
    from llmneo.steps import run_merge_eval

    cfg = guarded(load_config, preset, [*overrides, f"eval.max_kl_to_teacher={max_kl_to_teacher}"])
    result = guarded(run_merge_eval, cfg, dataset.path, teacher.path, student.path, adapter.path, model.path)
    metrics.log_metric("seconds", result["seconds"])
    for name, row in result["fidelity"].items():
        for key in ("kl_to_teacher", "top1_agreement", "perplexity"):
            metrics.log_metric(f"{name}_{key}", row[key])
    shutil.copy(f"{model.path}/report.md", report.path)
    passed = result["gate"]["passed"]
    model.metadata.update({"gate": "pass" if passed else "fail", **result["metrics"]})
    return "pass" if passed else "fail"
