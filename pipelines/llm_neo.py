"""The LLM-NEO DAG: data prep → teacher loading → NEO distill → merge-and-eval → (gate) → register.

    python -m llmneo_pipelines.llm_neo --output pipelines/llm_neo.yaml   # compile (`make pipeline`)
    llmneo run --preset tiny                                            # run locally via kfp.local

Caching policy: KFP caches a task on its component spec (image and code included) and inputs.
prep, load-teacher, distill and merge-eval are deterministic for given inputs (seeded), so they
cache; register writes to an external registry and never caches. A run is fully described by
``preset`` + ``overrides``; note that a cache hit means a changed preset *file* inside the same
image tag is not seen: bump the image tag, or submit with caching off (``llmneo run --no-cache``).

Retries: steps that touch the network or storage (prep, load-teacher, register) retry 2× with
backoff; distill retries once (preemption).
"""

import argparse

from kfp import compiler, dsl

from llmneo_components.distill import distill
from llmneo_components.merge_eval import merge_eval
from llmneo_components.prep import prep_data
from llmneo_components.register import register
from llmneo_components.teacher import load_teacher

PIPELINE_NAME = "llm-neo"


@dsl.pipeline(name=PIPELINE_NAME, description="LLM-NEO: distill a teacher LLM into a student's LoRA branch "
              "(CE + KL to the teacher, base frozen), evaluate, and register the merged model.")
def llm_neo(preset: str = "tiny", overrides: list = [], max_kl_to_teacher: float = 1000000.0):  # noqa: B006
    """LLM-NEO distillation.

    Args:
        preset: configuration preset (tiny, smollm2-demo, llama3.1-8b_to_3.2-1b, ...).
        overrides: configuration overrides as key=value strings, e.g. ["distill.alpha=0.9"].
        max_kl_to_teacher: register the model only if KL(teacher||student) on val is at most this.
    """
    prep_task = prep_data(preset=preset, overrides=overrides)
    prep_task.set_display_name("data prep").set_retry(num_retries=2, backoff_duration="30s")

    teacher_task = load_teacher(preset=preset, overrides=overrides, dataset=prep_task.outputs["dataset"])
    teacher_task.set_display_name("teacher loading").set_retry(num_retries=2, backoff_duration="60s")

    distill_task = distill(preset=preset, overrides=overrides, dataset=prep_task.outputs["dataset"],
                           teacher=teacher_task.outputs["teacher"], student=teacher_task.outputs["student"])
    distill_task.set_display_name("NEO distill").set_retry(num_retries=1, backoff_duration="60s")

    eval_task = merge_eval(preset=preset, overrides=overrides, max_kl_to_teacher=max_kl_to_teacher,
                           dataset=prep_task.outputs["dataset"], teacher=teacher_task.outputs["teacher"],
                           student=teacher_task.outputs["student"], adapter=distill_task.outputs["adapter"])
    eval_task.set_display_name("merge and eval")

    with dsl.If(eval_task.outputs["Output"] == "pass", name="registration-gate"):
        register_task = register(preset=preset, overrides=overrides, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                 model=eval_task.outputs["model"])
        register_task.set_display_name("register").set_caching_options(False)
        register_task.set_retry(num_retries=2, backoff_duration="30s")


def compile_pipeline(output: str) -> str:
    compiler.Compiler().compile(llm_neo, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile the llm-neo pipeline to KFP IR YAML")
    parser.add_argument("--output", default="pipelines/llm_neo.yaml")
    print(compile_pipeline(parser.parse_args(argv).output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
