"""The LLM-NEO sweep: one teacher, many students, the best one registered.

    python -m llmneo_pipelines.llm_neo_sweep --output pipelines/llm_neo_sweep.yaml   # compile (`make pipeline`)
    llmneo sweep --preset tiny --grid distill.alpha=0.5,0.9 --grid distill.lora_rank=16,64   # kfp.local

DAG: data prep → teacher loading (with ``teacher.mode=offline`` the top-k cache: the teacher runs once
for the whole sweep) → plan (the ``grid`` parameter expanded into points) → ``dsl.ParallelFor`` over
the points, at most ``parallelism`` at a time: NEO distill → merge-and-eval with the point's
overrides → select (every point's evaluation card ranked by ``metrics``, the winner gated, the sweep
report) → register the winner only, the whole sweep table in its lineage.

A failing point does not sink the sweep. In KFP a failed task fails its loop iteration, the
ParallelFor and the run, and no task after the loop starts; the Argo DAG behind it also stops
scheduling the remaining iterations (argoproj/argo-workflows: a DAG fails fast by default). So the
point steps run with ``LLMNEO_SWEEP_POINT=1``: a failure is written into the step's output
(``sweep_point.json``: status failed, the error line) and the task succeeds; the point's merge-eval
passes the failure on, and select shows it as failed and chooses among the others. A point's
recorded failure is a successful task for KFP and so is cached like a result: to retry failed
points, submit with ``--no-cache``.

Caching: a point's distill and merge-eval inputs are the shared inputs plus the point's overrides,
and no run id, so the same point in a later (widened) sweep is a cache hit; plan puts each distinct
point once. Select and register never cache (register writes to the registry). One node per point
(``distill.nnodes`` 1), and one GPU count (``gpus``) for both of its steps: the merge-and-eval pod's
limit comes from a parameter that is also a component input (kfp.local 2.17 does not pass a loop
body a pipeline parameter used only in a resource limit); a point's retry restarts its training (no checkpoint folder is shared).

``parallelism`` is fixed when compiling: KFP's ParallelFor takes an int (kfp/dsl/tasks_group.py
ParallelFor) and the pipeline spec stores it as ``iteratorPolicy.parallelismLimit`` (an int32 of
pipeline_spec.proto), not a parameter. ``llmneo submit --sweep --parallelism N`` compiles with N.
"""

import argparse

from kfp import compiler, dsl, kubernetes

from llmneo.sweep import DEFAULT_METRICS, POINT_ENV
from llmneo_components.distill import distill
from llmneo_components.generate import generate_answers
from llmneo_components.images import CPU_IMAGE
from llmneo_components.merge_eval import merge_eval
from llmneo_components.prep import prep_data
from llmneo_components.register import register
from llmneo_components.sweep_plan import plan_sweep
from llmneo_components.sweep_select import select_sweep
from llmneo_components.teacher import load_teacher
from llmneo_pipelines.llm_neo import (
    A100_TOLERATIONS,
    TIMEOUT_S,
    _gpu_pool,
    _light,
    _secrets_and_cache,
    _stable_header,
)

PIPELINE_NAME = "llm-neo-sweep"
PARALLELISM = 4  # points trained at once; the default of the committed YAML
DEFAULT_GRID = ["distill.alpha=0.5,0.9"]


def build(parallelism: int = PARALLELISM):
    """The sweep pipeline with at most ``parallelism`` points at a time (0: no limit)."""

    @dsl.pipeline(name=PIPELINE_NAME, description="LLM-NEO sweep: data prep and the teacher once, then distill and "
                  "evaluate every grid point, rank them, register the best one with the sweep table in its lineage.")
    def llm_neo_sweep(preset: str = "tiny", overrides: list = [], config: str = "",  # noqa: B006
                      grid: list = DEFAULT_GRID, metrics: list = DEFAULT_METRICS,  # noqa: B006
                      max_kl_to_teacher: float = 1000000.0, gpus: str = "0",
                      gpu_node_selector: dict = {}, gpu_tolerations: list = A100_TOLERATIONS,  # noqa: B006
                      registry_uri: str = ""):
        """LLM-NEO sweep.

        Args:
            preset: configuration preset (tiny, smollm2-demo, llama3.1-8b_to_3.2-1b, ...).
            overrides: configuration overrides shared by every point, as key=value strings.
            config: the resolved configuration as YAML (llmneo submit sends it); when set it replaces the preset file, overrides still apply on top.
            grid: swept settings as KEY=V1,V2 strings, every combination is a point, e.g. ["distill.alpha=0.5,0.9", "distill.lora_rank=16,64"].
            metrics: ranking metrics of the points' evaluation cards; the first ranks, the next break ties (min:NAME / max:NAME set the direction).
            max_kl_to_teacher: register the winner only if KL(teacher||student) on val is at most this.
            gpus: GPUs of each point's distill (= torchrun processes) and merge-and-eval pods, a whole number as text ("0" = CPU, processes from the preset).
            gpu_node_selector: node selector of the GPU pool as JSON, e.g. {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}.
            gpu_tolerations: tolerations for the GPU pool's taints as a JSON list of Kubernetes tolerations.
            registry_uri: where register stores the winner, e.g. s3://bucket/registry; empty = the configuration's registry.uri.
        """
        cfg = dict(preset=preset, config=config)
        generate_task = generate_answers(**cfg, overrides=overrides)  # data.answers=given: a card only
        generate_task.set_display_name("teacher answers").set_retry(num_retries=1, backoff_duration="60s")
        _secrets_and_cache(_gpu_pool(generate_task, gpus, gpu_node_selector, gpu_tolerations), "generate")
        kubernetes.set_timeout(generate_task, TIMEOUT_S["generate"])
        prep_task = prep_data(**cfg, overrides=overrides, answers=generate_task.outputs["answers"])
        prep_task.set_display_name("data prep").set_retry(num_retries=2, backoff_duration="30s")
        _secrets_and_cache(_light(prep_task, "prep"), "prep")
        kubernetes.set_timeout(prep_task, TIMEOUT_S["prep"])

        teacher_task = load_teacher(**cfg, overrides=overrides, dataset=prep_task.outputs["dataset"])
        teacher_task.set_display_name("teacher loading").set_retry(num_retries=2, backoff_duration="60s")
        _secrets_and_cache(_light(teacher_task, "teacher"), "teacher")
        kubernetes.set_timeout(teacher_task, TIMEOUT_S["teacher"])

        plan_task = plan_sweep(**cfg, overrides=overrides, grid=grid)
        plan_task.set_display_name("sweep plan").set_cpu_request("1").set_memory_request("2Gi")

        with dsl.ParallelFor(plan_task.output, parallelism=parallelism, name="sweep-points") as point:
            distill_task = distill(**cfg, overrides=point, gpus=gpus, nodes=1,
                                   dataset=prep_task.outputs["dataset"], teacher=teacher_task.outputs["teacher"],
                                   student=teacher_task.outputs["student"])
            distill_task.set_display_name("NEO distill").set_env_variable(POINT_ENV, "1")
            _secrets_and_cache(_gpu_pool(distill_task, gpus, gpu_node_selector, gpu_tolerations), "distill")
            kubernetes.empty_dir_mount(distill_task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
            kubernetes.set_timeout(distill_task, TIMEOUT_S["distill"])

            eval_task = merge_eval(**cfg, overrides=point, max_kl_to_teacher=max_kl_to_teacher,
                                   dataset=prep_task.outputs["dataset"], teacher=teacher_task.outputs["teacher"],
                                   student=teacher_task.outputs["student"], adapter=distill_task.outputs["adapter"])
            eval_task.set_display_name("merge and eval").set_env_variable(POINT_ENV, "1")
            _secrets_and_cache(_gpu_pool(eval_task, gpus, gpu_node_selector, gpu_tolerations), "eval")
            kubernetes.empty_dir_mount(eval_task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
            kubernetes.set_timeout(eval_task, TIMEOUT_S["eval"])

        select_task = select_sweep(overrides=overrides, metrics=metrics,
                                   models=dsl.Collected(eval_task.outputs["model"]))
        select_task.set_display_name("select the best point").set_caching_options(False)
        select_task.set_cpu_request("1").set_memory_request("8Gi")

        with dsl.If(select_task.outputs["Output"] == "pass", name="registration-gate"):
            register_task = register(**cfg, overrides=select_task.outputs["overrides"],
                                     run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, model=select_task.outputs["winner"],
                                     registry_uri=registry_uri)
            register_task.set_display_name("register the winner").set_caching_options(False)
            register_task.set_retry(num_retries=2, backoff_duration="30s")
            register_task.set_container_image(CPU_IMAGE)  # no torch needed: the light image
            _secrets_and_cache(_light(register_task, "register"), "register", cache=False)
            kubernetes.set_timeout(register_task, TIMEOUT_S["register"])

    return llm_neo_sweep


llm_neo_sweep = build()


def compile_pipeline(output: str, parallelism: int = PARALLELISM) -> str:
    compiler.Compiler().compile(build(parallelism), output)
    _stable_header(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile the llm-neo-sweep pipeline to KFP IR YAML")
    parser.add_argument("--output", default="pipelines/llm_neo_sweep.yaml")
    parser.add_argument("--parallelism", type=int, default=PARALLELISM,
                        help=f"points trained at once (default {PARALLELISM}; 0: no limit)")
    args = parser.parse_args(argv)
    print(compile_pipeline(args.output, args.parallelism))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
