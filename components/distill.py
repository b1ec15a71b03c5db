"""Component: NEO distillation (torchrun on one node, or a Kubeflow Trainer TrainJob on several)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(preset: str, overrides: list, config: str, gpus: str, nodes: int, dataset: Input[Dataset], teacher: Input[Model],
            student: Input[Model], adapter: Output[Model], metrics: Output[Metrics],
            checkpoints: str = "", task_config: dsl.TaskConfig = None):
    """Train the student's LoRA branch on (1-a)*CE + a*T^2*KL(teacher||student) with torchrun.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings.
        config: the resolved configuration as YAML (replaces the preset when set; see llmneo_components.params).
        gpus: GPUs per node = torchrun processes per node, as a string ("0": CPU, processes from the
            configuration): KFP resolves accelerator limits from STRING parameters only.
        nodes: nodes; more than 1 launches a Kubeflow Trainer TrainJob (llmneo/cluster.py).
        dataset: the prepared dataset.
        teacher: teacher model folder.
        student: base student model folder.
        adapter: output folder: adapter/ (lora, neo) or model/ (sft, kd), train_log.jsonl, card.json.
        metrics: final losses and throughput.
        checkpoints: folder on a volume that outlives the pod (the cache PVC): checkpoints go to
            <checkpoints>/<run>/<config fingerprint>, <run> = the run's Argo workflow ($LLMNEO_WORKFLOW,
            from the pod's label; not an input, which would defeat caching), so a retried task resumes
            instead of starting over. Unused when the folder's parent is missing.
        task_config: (multi-node) the task's resources, tolerations, node selector and env, forwarded
            by KFP to the TrainJob.
    """
    import dataclasses
    import os

    from llmneo.errors import guarded
    from llmneo.steps import distill_student
    from llmneo.sweep import PointGuard
    from llmneo_components.params import checkpoint_setting, load_run_config, parse_gpus

    with PointGuard(adapter.path, overrides, "distill"):  # in a sweep: a failure is recorded, the sweep goes on
        # the pipeline's GPU/node counts win over the preset: the pod has exactly that many GPUs
        n_gpus = parse_gpus(gpus, "distill_gpus")
        cluster = [f"distill.nnodes={nodes}"] + ([f"distill.nproc_per_node={n_gpus}"] if n_gpus > 0 else [])
        cfg = load_run_config(preset, overrides, config, cluster)
        from llmneo.cluster import WORKFLOW_ENV, shared_volume_at

        task = dataclasses.asdict(task_config) if task_config is not None else None
        # several nodes: on the cache PVC that KFP forwards to every TrainJob node (a retry's new TrainJob
        # resumes from there), never in a node's emptyDir
        keep = checkpoint_setting(cfg, checkpoints, os.environ.get(WORKFLOW_ENV, ""),
                                  shared=shared_volume_at(task, checkpoints))
        if keep:
            cfg = load_run_config(preset, overrides, config, cluster + keep)
            print(f"distill: checkpoints in {cfg.distill.checkpoint_uri}", flush=True)
            # retention: runs that failed for good leave their checkpoints; the next run removes old ones
            from llmneo.launch import prune_checkpoints
            from llmneo_components.params import CHECKPOINT_RETENTION_DAYS

            prune_checkpoints(checkpoints, CHECKPOINT_RETENTION_DAYS, keep=cfg.distill.checkpoint_uri,
                              log=lambda line: print(f"distill: {line}", flush=True))
        from llmneo.preflight import requested_gpus

        # the trainer refuses to run on fewer GPUs than the pod asked for (llmneo.preflight.check_gpus);
        # set for this call only, so that a step run in-process leaves the caller's environment as it was
        with requested_gpus(n_gpus):
            card = guarded(distill_student, cfg, dataset.path, teacher.path, student.path, adapter.path, task)
        for name, value in card.step_metrics().items():
            metrics.log_metric(name, value)
        adapter.metadata.update(card.metadata())


# The same function as a TrainJob launcher for distill_nodes > 1: the pod itself stays small (CPU);
# KFP hands the task's GPUs, tolerations, node selector and volumes to the function (task_config)
# instead of applying them to the pod, and llmneo.cluster puts them on every training node.
distill_multinode = dsl.component(
    distill.python_func, base_image=IMAGE, install_kfp_package=False,
    task_config_passthroughs=[
        dsl.TaskConfigField.RESOURCES,
        dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
        dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
        dsl.TaskConfigField.KUBERNETES_AFFINITY,
        dsl.TaskConfigField.KUBERNETES_VOLUMES,
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),  # S3 credentials
    ])
distill_multinode.component_spec.name = "distill-multinode"
