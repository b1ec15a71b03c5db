"""The LLM-NEO DAG: teacher answers (data.answers) → data prep → teacher loading → NEO distill → merge-and-eval → (gate) → register.

    python -m llmneo_pipelines.llm_neo --output pipelines/llm_neo.yaml   # compile (`make pipeline`)
    llmneo run --preset tiny                                            # run locally via kfp.local

Caching policy: KFP caches a task on its component spec (image and code included) and inputs.
prep, load-teacher, distill and merge-eval are deterministic for given inputs (seeded), so they
cache; register writes to an external registry and never caches. A run is fully described by
``config`` (or ``preset``) + ``overrides``: ``llmneo submit`` sends the resolved configuration
itself, so a changed preset is a changed input. Started from the Kubeflow UI with ``config`` empty,
the preset file inside the image is used: after changing a preset there, bump the image tag.
``llmneo run`` (kfp.local) caches nothing: every local run executes every step.

Retries: steps that touch the network or storage (prep, load-teacher, register) retry 2× with
backoff; distill retries once (preemption) and resumes from its checkpoints under
``/cache/checkpoints/<run's workflow>/<config fingerprint>`` on the cache volume. The run key reaches the
pod as an env var from its label, not as an input: KFP's cache key hashes every input value, so a
per-run input would make distill miss the cache on every run.

Registry: register stores into ``registry_uri`` (or the configuration's registry.uri); a folder
inside the pod would be lost with it, so ``llmneo submit``/``schedule sync`` require an s3:// URI and
the register step refuses a folder on no volume; with ``registry_uri`` empty (a UI run with the defaults)
it returns "skipped: no s3 registry" instead, so that run succeeds.

Defaults (a run started from the Kubeflow UI as is): the ``tiny`` preset on CPU (0 GPUs).

Machine fields are STRING parameters: the KFP driver resolves a pod-spec placeholder such as the
accelerator limit with ``GetStringValue()`` (backend/src/v2/driver/resolve.go,
resolvePodSpecInputRuntimeParameter), so an integer parameter would become an empty limit.

Kubernetes (kfp-kubernetes; kfp.local ignores it): distill asks for ``distill_gpus`` GPUs on the pool
chosen by ``gpu_node_selector`` / ``gpu_tolerations`` (pipeline parameters, e.g. from a
k8s/overlays/*/pool.yaml), with /dev/shm; merge-and-eval for ``eval_gpus``; prep, teacher loading
and register are CPU only. Each step gets only the S3/hub secrets it needs (``STEP_SECRETS``) as
env, the cache volume and a deadline. ``distill_nodes`` > 1 takes the other branch: the same component as a small launcher pod
whose GPU/pool settings KFP forwards (TaskConfig passthrough, KFP >= 2.15) to a Kubeflow Trainer
TrainJob; the launcher learns its pod's name, uid and workflow (downward API) to own the TrainJob
and to find it again after a retry.
"""

import argparse
import ast
import re

from kfp import compiler, dsl, kubernetes

from llmneo.cluster import HUB_SECRET, POD_IDENTITY_ENV, S3_SECRET, SECRET_ENV, WORKFLOW_ENV, WORKFLOW_FIELD
from llmneo_components.distill import distill, distill_multinode
from llmneo_components.generate import generate_answers
from llmneo_components.images import CPU_IMAGE
from llmneo_components.merge_eval import merge_eval
from llmneo_components.prep import prep_data
from llmneo_components.register import register
from llmneo_components.teacher import load_teacher

PIPELINE_NAME = "llm-neo"
GPU = "nvidia.com/gpu"
CACHE_PVC = "llmneo-cache"  # k8s/base/pvc.yaml: HF_HOME and LLMNEO_CACHE of the image live under /cache
# One-node distill checkpoints on the cache volume, keyed by run and configuration: the task's output
# folder is an emptyDir uploaded only on success, so a retried (preempted) pod would restart at step 0.
CHECKPOINTS = "/cache/checkpoints"
# Pod deadlines (activeDeadlineSeconds): a hung step fails instead of holding its node forever.
TIMEOUT_S = {"generate": 24 * 3600, "prep": 4 * 3600, "teacher": 6 * 3600, "distill": 72 * 3600, "eval": 12 * 3600, "register": 2 * 3600}
# CPU/memory requests of the light steps (no GPU): enough to tokenize and to load/verify an 8B teacher.
LIGHT = {"prep": ("2", "8Gi"), "teacher": ("4", "48Gi"), "register": ("1", "2Gi")}
A100_TOLERATIONS = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]


# Least privilege: the credentials each step may need, and nothing more (docs/kubeflow.md). prep and
# load-teacher read data.source / model sources that may be s3:// or hf:; load-teacher pins a hub
# model to its commit and downloads it into the cache volume, where distill and merge-eval find it
# without the hub (llmneo.models.hub_snapshot reads a pinned commit locally first); they still
# re-list s3:// model sources and write checkpoints/staging to S3. register writes the registry.
STEP_SECRETS = {"generate": (S3_SECRET, HUB_SECRET), "prep": (S3_SECRET, HUB_SECRET), "teacher": (S3_SECRET, HUB_SECRET), "distill": (S3_SECRET,),
                "distill-multinode": (S3_SECRET,), "eval": (S3_SECRET,), "register": (S3_SECRET,)}


def _secrets_and_cache(task: dsl.PipelineTask, step: str, cache: bool = True) -> dsl.PipelineTask:
    """The step's credentials (:data:`STEP_SECRETS`) from the Kubernetes secrets (optional), and
    the cache volume."""
    for secret in STEP_SECRETS[step]:
        keys = SECRET_ENV[secret]
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys}, optional=True)
    if cache:
        kubernetes.mount_pvc(task, pvc_name=CACHE_PVC, mount_path="/cache")
    return task


def _gpu_pool(task: dsl.PipelineTask, gpus, node_selector, tolerations) -> dsl.PipelineTask:
    """GPUs (a pipeline parameter), node selector and tolerations of the A100 pool, /dev/shm."""
    task.set_accelerator_type(GPU).set_accelerator_limit(gpus)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return task


def _launcher_identity(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The launcher pod's identity (downward API), for the TrainJob's ownerReference and its
    deterministic name: a retry of the same task in the same run re-attaches to the same job."""
    for env, path in POD_IDENTITY_ENV.items():
        kubernetes.use_field_path_as_env(task, env, path)
    return task


def _light(task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
    cpu, memory = LIGHT[step]
    return task.set_cpu_request(cpu).set_memory_request(memory)


@dsl.pipeline(name=PIPELINE_NAME, description="LLM-NEO: distill a teacher LLM into a student's LoRA branch "
              "(CE + KL to the teacher, base frozen), evaluate, and register the merged model.")
def llm_neo(preset: str = "tiny", overrides: list = [], config: str = "",  # noqa: B006
            max_kl_to_teacher: float = 1000000.0, distill_gpus: str = "0", distill_nodes: int = 1,
            eval_gpus: str = "0", gpu_node_selector: dict = {},  # noqa: B006
            gpu_tolerations: list = A100_TOLERATIONS, registry_uri: str = ""):  # noqa: B006
    """LLM-NEO distillation.

    Args:
        preset: configuration preset (tiny, smollm2-demo, llama3.1-8b_to_3.2-1b, ...).
        overrides: configuration overrides as key=value strings, e.g. ["distill.alpha=0.9"].
        config: the resolved configuration as YAML (llmneo submit sends it); when set it replaces the preset file, overrides still apply on top.
        max_kl_to_teacher: register the model only if KL(teacher||student) on val is at most this.
        distill_gpus: GPUs per node for distill = torchrun processes per node, a whole number as text ("0" = CPU, processes from the preset).
        distill_nodes: nodes for distill; more than 1 runs a Kubeflow Trainer TrainJob (set cluster.staging_uri).
        eval_gpus: GPUs for merge-and-eval, a whole number as text ("0" = CPU).
        gpu_node_selector: node selector of the GPU pool as JSON, e.g. {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}.
        gpu_tolerations: tolerations for the GPU pool's taints as a JSON list of Kubernetes tolerations.
        registry_uri: where register stores the model, e.g. s3://bucket/registry; empty = the configuration's registry.uri (which must then be an s3:// URI: a folder inside the pod is lost).
    """
    cfg = dict(preset=preset, overrides=overrides, config=config)
    # the teacher writes the answers (data.answers=missing|teacher; with given a card only): its own
    # cacheable output; its shards live on the cache volume (LLMNEO_CACHE), so a retry resumes
    generate_task = generate_answers(**cfg)
    generate_task.set_display_name("teacher answers").set_retry(num_retries=1, backoff_duration="60s")
    # on the eval GPUs (the teacher must fit there as for evaluation); "0" = CPU
    _secrets_and_cache(_gpu_pool(generate_task, eval_gpus, gpu_node_selector, gpu_tolerations), "generate")
    kubernetes.set_timeout(generate_task, TIMEOUT_S["generate"])
    prep_task = prep_data(**cfg, answers=generate_task.outputs["answers"])
    prep_task.set_display_name("data prep").set_retry(num_retries=2, backoff_duration="30s")
    _secrets_and_cache(_light(prep_task, "prep"), "prep")
    kubernetes.set_timeout(prep_task, TIMEOUT_S["prep"])

    teacher_task = load_teacher(**cfg, dataset=prep_task.outputs["dataset"])
    teacher_task.set_display_name("teacher loading").set_retry(num_retries=2, backoff_duration="60s")
    _secrets_and_cache(_light(teacher_task, "teacher"), "teacher")
    kubernetes.set_timeout(teacher_task, TIMEOUT_S["teacher"])

    distill_inputs = dict(**cfg, gpus=distill_gpus, nodes=distill_nodes,
                          dataset=prep_task.outputs["dataset"], teacher=teacher_task.outputs["teacher"],
                          student=teacher_task.outputs["student"])
    with dsl.If(distill_nodes == 1, name="one-node"):  # torchrun in the pod, which holds the GPUs
        distill_task = distill(**distill_inputs, checkpoints=CHECKPOINTS)
        distill_task.set_display_name("NEO distill").set_retry(num_retries=1, backoff_duration="60s")
        _secrets_and_cache(_gpu_pool(distill_task, distill_gpus, gpu_node_selector, gpu_tolerations), "distill")
        kubernetes.empty_dir_mount(distill_task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        kubernetes.use_field_path_as_env(distill_task, WORKFLOW_ENV, WORKFLOW_FIELD)  # the checkpoints' run key
        kubernetes.set_timeout(distill_task, TIMEOUT_S["distill"])
    with dsl.Else(name="several-nodes"):  # a CPU launcher pod; the GPU settings go to the TrainJob
        multinode_task = distill_multinode(**distill_inputs, checkpoints=CHECKPOINTS)
        multinode_task.set_display_name("NEO distill (TrainJob)").set_retry(num_retries=1, backoff_duration="60s")
        _secrets_and_cache(_gpu_pool(multinode_task, distill_gpus, gpu_node_selector, gpu_tolerations),
                           "distill-multinode")
        multinode_task.set_env_variable("LLMNEO_IMAGE", multinode_task.container_spec.image)
        _launcher_identity(multinode_task)  # also the checkpoints' run key
        kubernetes.set_timeout(multinode_task, TIMEOUT_S["distill"])
    adapter = dsl.OneOf(distill_task.outputs["adapter"], multinode_task.outputs["adapter"])

    eval_task = merge_eval(**cfg, max_kl_to_teacher=max_kl_to_teacher,
                           dataset=prep_task.outputs["dataset"], teacher=teacher_task.outputs["teacher"],
                           student=teacher_task.outputs["student"], adapter=adapter)
    eval_task.set_display_name("merge and eval")
    _secrets_and_cache(_gpu_pool(eval_task, eval_gpus, gpu_node_selector, gpu_tolerations), "eval")
    kubernetes.empty_dir_mount(eval_task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    kubernetes.set_timeout(eval_task, TIMEOUT_S["eval"])

    with dsl.If(eval_task.outputs["Output"] == "pass", name="registration-gate"):
        register_task = register(**cfg, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                 model=eval_task.outputs["model"], registry_uri=registry_uri)
        register_task.set_display_name("register").set_caching_options(False)
        register_task.set_retry(num_retries=2, backoff_duration="30s")
        register_task.set_container_image(CPU_IMAGE)  # no torch needed: the light image
        _secrets_and_cache(_light(register_task, "register"), "register", cache=False)
        kubernetes.set_timeout(register_task, TIMEOUT_S["register"])


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return [_sorted(v) for v in value] if isinstance(value, list) else value


def _stable_header(path: str) -> None:
    """kfp writes dict defaults into the YAML's header comment in protobuf map order, which varies
    between processes: sort their keys so that compiling twice gives the same file (drift test)."""
    lines = open(path).read().split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"^(#    \w+: \w+ \[Default: )(.*)(\])$", line)
        if m and m.group(2)[:1] in "[{":
            lines[i] = m.group(1) + str(_sorted(ast.literal_eval(m.group(2)))) + m.group(3)
    open(path, "w").write("\n".join(lines))


def compile_pipeline(output: str) -> str:
    compiler.Compiler().compile(llm_neo, output)
    _stable_header(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile the llm-neo pipeline to KFP IR YAML")
    parser.add_argument("--output", default="pipelines/llm_neo.yaml")
    print(compile_pipeline(parser.parse_args(argv).output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
