"""Component: merge the adapter and evaluate."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_eval(preset: str, overrides: list, config: str, max_kl_to_teacher: float, dataset: Input[Dataset],
               teacher: Input[Model], student: Input[Model], adapter: Input[Model], model: Output[Model],
               metrics: Output[Metrics], report: Output[Markdown], report_html: Output[HTML]) -> str:
    """Merge the LoRA adapter into the base student, evaluate it against the teacher, apply the gate.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings.
        config: the resolved configuration as YAML (replaces the preset when set; see llmneo_components.params).
        max_kl_to_teacher: gate threshold on KL(teacher||student) over the val split.
        dataset: the prepared dataset (val split).
        teacher: teacher model folder.
        student: base student model folder.
        adapter: distill output folder.
        model: merged Hugging Face model folder with eval.json, report.md/html and README model card.
        metrics: base student, distilled and teacher side by side (fidelity and lm-eval scores), gate.
        report: Markdown report (comparison table, lm-eval scores, training table).
        report_html: the same report as one self-contained HTML page, loss curves included.

    Returns:
        "pass" or "fail": the registration gate (all configured thresholds hold).
    """
    import shutil

    from llmneo.cards import EvalCard
    from llmneo.errors import guarded
    from llmneo.steps import merge_and_evaluate
    from llmneo.sweep import PointGuard
    from llmneo_components.params import load_run_config

    # in a sweep: a failure (here or in this point's distill) is recorded, the sweep goes on
    with PointGuard(model.path, overrides, "merge-eval", upstream=adapter.path) as point:
        if point.run:
            cfg = load_run_config(preset, overrides, config, [f"eval.max_kl_to_teacher={max_kl_to_teacher}"])
            guarded(merge_and_evaluate, cfg, dataset.path, teacher.path, student.path, adapter.path, model.path)
            card = guarded(EvalCard.read, model.path)
            for name, value in card.step_metrics().items():
                metrics.log_metric(name, value)
            shutil.copy(f"{model.path}/report.md", report.path)
            shutil.copy(f"{model.path}/report.html", report_html.path)
            model.metadata.update(card.metadata())
            return "pass" if card.passed else "fail"
    for page in (report.path, report_html.path):  # a failed sweep point: its error, in place of the report
        with open(page, "w") as f:
            f.write(f"sweep point failed: {point.error_line()}\n")
    return "fail"
