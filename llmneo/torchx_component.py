"""TorchX component: the distill trainer on TorchX's schedulers (local, Kubernetes/Volcano, Slurm, ...).

    llmneo distill ... --out runs/x distill.max_steps=0    # or any folder written by llmneo.launch.write_workdir
    torchx run -s local_cwd llmneo/torchx_component.py:distill --workdir runs/x --nproc_per_node 2
    torchx run -s kubernetes -cfg queue=default,namespace=team-a \\
        llmneo/torchx_component.py:distill --workdir /cache/work/x --nnodes 2 --nproc_per_node 8 --gpu 8 \\
        --mounts type=volume,src=llmneo-cache,dst=/cache

The AppDef is :func:`torchx.components.dist.ddp` running ``python -m llmneo.trainer --workdir DIR``
(the same entry as ``llmneo distill``'s torchrun, :data:`llmneo.launch.TRAINER_MODULE`) under
torchrun with TorchX's c10d rendezvous. The work folder (``config.yaml``, ``inputs.json``, written by
:func:`llmneo.launch.write_workdir`) and the input folders it names must be readable at the same
paths by every node — on a cluster, a shared volume (``--mounts``). The trainer writes the adapter,
``train_log.jsonl`` and ``card.json`` into the work folder, and resumes from its checkpoints when
the job is re-run (``distill.checkpoint_uri`` or ``<workdir>/checkpoint``).
"""

# TorchX's component linter (torchx/specs/file_linter.py) reads the signature's AST: it accepts
# typing.Optional/List/Dict, not ``X | None`` or ``list[str]``, and needs evaluated annotations.
from typing import List, Optional  # noqa: UP035

from torchx import specs
from torchx.components import dist

from llmneo.launch import TRAINER_MODULE

IMAGE = "llmneo/llmneo:0.1.0"  # = llmneo_components.images.DEFAULT_IMAGE (the CUDA image; tests check)


def distill(workdir: str, nnodes: int = 1, nproc_per_node: int = 2, image: str = IMAGE, cpu: int = 8,
            gpu: int = 0, memMB: int = 32768, h: Optional[str] = None, omp_threads: int = 0,  # noqa: UP045
            max_retries: int = 0, rdzv_port: int = 29500,
            mounts: Optional[List[str]] = None) -> specs.AppDef:  # noqa: UP006, UP045
    """NEO distillation: torchrun of the llmneo trainer on a prepared work folder.

    Args:
        workdir: the trainer's work folder (config.yaml, inputs.json); the output goes there too
        nnodes: nodes (= distill.nnodes)
        nproc_per_node: trainer processes per node, one per GPU (= distill.nproc_per_node)
        image: container image (ignored by local_cwd, which runs in this environment)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a named resource of the scheduler instead of cpu/gpu/memMB
        omp_threads: OMP_NUM_THREADS of each process (0: torchrun's default of 1)
        max_retries: node restarts before the job fails (a restart resumes from the checkpoint)
        rdzv_port: port of the c10d rendezvous on node 0
        mounts: volumes, e.g. type=volume,src=llmneo-cache,dst=/cache (see torchx.specs.parse_mounts)
    """
    env = {"OMP_NUM_THREADS": str(omp_threads)} if omp_threads > 0 else {}
    return dist.ddp("--workdir", workdir, m=TRAINER_MODULE, image=image, name="llmneo-distill", h=h,
                    cpu=cpu, gpu=gpu, memMB=memMB, j=f"{nnodes}x{nproc_per_node}", env=env,
                    max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts)
