"""Trainer checkpoints: save periodically and on SIGTERM, resume exactly.

Layout, inside the distill output folder (so a retried KFP step finds it in its output)::

    checkpoint/latest                   "step-000040"  (replaced atomically, after the folder is complete)
    checkpoint/step-000040/
        state/                          torch.distributed.checkpoint (DCP): trainable weights + AdamW
                                        state; one file per rank, sharded under FSDP, deduplicated under DDP
        trainer_state.json              step, data position, LR scheduler, log history, config hash, world
        rng/rank-00000.pt               each rank's python / torch / CUDA RNG states

Only *trainable* tensors are saved: the adapter for lora/neo (the frozen base is reloaded from the
student artifact), everything for sft/kd. A folder is written as ``step-N.tmp`` and renamed when every
rank has finished, so a checkpoint is either complete or absent.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# loading leaves the frozen base alone; dcp.load itself fails if a trainable tensor is missing
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _single_process_ok():
    """DCP warns that it 'assumes' a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``<out>/checkpoint``), or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / TRAINER_STATE).is_file() else None


def save(root: str | Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict, rank: int, device: torch.device) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    root = Path(root)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_OPTIONS)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save(rng_state(device), tmp / "rng" / f"rank-{rank:05d}.pt")
    _barrier()
    if rank == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        pointer.replace(root / LATEST)
        for old in root.glob("step-*"):  # keep only the newest checkpoint
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
         device: torch.device) -> dict:
    """Collective: restore weights, optimizer and this rank's RNG; returns the trainer state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_LOAD_OPTIONS)
    rng_file = path / "rng" / f"rank-{rank:05d}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than were saved
        set_rng_state(torch.load(rng_file, weights_only=False), device)
    return json.loads((path / TRAINER_STATE).read_text())
