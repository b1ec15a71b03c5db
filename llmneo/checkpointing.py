"""Trainer checkpoints: save periodically and on SIGTERM, verify, resume exactly.

Layout, in the checkpoint folder (``<distill output>/checkpoint``: a retried KFP step finds it in its output)::

    checkpoint/latest                   "step-000040"  (informational: resuming scans the step folders)
    checkpoint/step-000040/
        state/                          torch.distributed.checkpoint (DCP): trainable weights + AdamW
                                        state; one file per rank, sharded under FSDP, deduplicated under DDP
        trainer_state.json              step, data position, LR scheduler, log history, config hash, world
        rng/rank-00000.safetensors      each rank's torch / CUDA RNG states (tensors) and python's
                                        ``random`` state (JSON in the file's metadata): no pickle
        manifest.json                   SHA-256 and size of every file above, written last
    checkpoint/step-000030/             the previous one (``distill.keep_last_checkpoints``, default 2)

Only *trainable* tensors are saved: the adapter for lora/neo (the frozen base is reloaded from the
student artifact), everything for sft/kd. A folder is written as ``step-N.tmp`` and renamed when every
rank has finished and its manifest is written, so a checkpoint is either complete or absent.

Resuming (:func:`select`) takes the newest folder whose files match its manifest; a corrupt one
(truncated shard, garbage metadata, bad trainer state) is skipped with a one-line warning, and when
none is valid the run stops with one line naming the file and the remedy (``distill.resume=false``).
The manifest guards against faults, not attackers: DCP's ``.metadata`` file is a pickle, so a
checkpoint folder must be as trusted as the code that runs it (only the step's own output, or a
location the pipeline owns).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from llmneo.errors import UserError, first_line
from llmneo.storage import sha256_file

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
TRAINER_STATE_KEYS = ("step", "scheduler", "history", "config_hash")
_STEP_DIR = re.compile(r"step-(\d+)")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# loading leaves the frozen base alone; dcp.load itself fails if a trainable tensor is missing
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointInvalid(UserError):
    """A checkpoint folder that fails verification or loading; the message names the file."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _single_process_ok():
    """DCP warns that it 'assumes' a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --------------------------------------------------------------------------------------------
# RNG state, pickle-free
# --------------------------------------------------------------------------------------------


def rng_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / "rng" / f"rank-{rank:05d}.safetensors"


def save_rng(path: str | Path, device: torch.device) -> None:
    """This process's python / torch / CUDA RNG states: tensors in safetensors, python's state as JSON."""
    version, internal, gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    python = json.dumps({"version": version, "state": list(internal), "gauss_next": gauss})
    save_file(tensors, str(path), metadata={"python": python})


def load_rng(path: str | Path) -> tuple[dict[str, torch.Tensor], tuple]:
    """What :func:`save_rng` wrote, parsed (nothing applied yet): (tensors, python state)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            python = json.loads((f.metadata() or {})["python"])
        state = (int(python["version"]), tuple(int(x) for x in python["state"]), python["gauss_next"])
        if "torch" not in tensors or tensors["torch"].dtype != torch.uint8:
            raise ValueError("no torch RNG state")
    except Exception as e:  # safetensors, JSON and key errors alike: the file is not what we wrote
        raise CheckpointInvalid(f"{path}: unreadable RNG state ({first_line(e)})") from None
    return tensors, state


def set_rng(tensors: dict[str, torch.Tensor], python: tuple, device: torch.device) -> None:
    random.setstate(python)
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)


# --------------------------------------------------------------------------------------------
# Manifest, verification, selection
# --------------------------------------------------------------------------------------------


def write_manifest(folder: str | Path) -> Path:
    """SHA-256 and size of every file in ``folder`` (but the manifest), as ``manifest.json``."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    return tmp.replace(folder / MANIFEST)


def verify(folder: str | Path) -> dict:
    """Check every file of ``folder`` against its manifest and parse its trainer state; returns the
    trainer state. Raises :class:`CheckpointInvalid` naming the first bad file."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        entries = [(name, str(e["sha256"]), int(e["size"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointInvalid(f"{folder / MANIFEST}: missing or unreadable ({first_line(e)})") from None
    for name, digest, size in entries:
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise CheckpointInvalid(f"{folder / MANIFEST}: entry {name!r} points outside the checkpoint")
        if not path.is_file():
            raise CheckpointInvalid(f"{path}: missing")
        if path.stat().st_size != size:
            raise CheckpointInvalid(f"{path}: {path.stat().st_size} bytes, the manifest says {size} (truncated?)")
        if sha256_file(path) != digest:
            raise CheckpointInvalid(f"{path}: SHA-256 differs from the manifest (corrupted)")
    return verify_state(folder)


def step_of(folder: Path) -> int | None:
    m = _STEP_DIR.fullmatch(folder.name)
    return int(m.group(1)) if m else None


def candidates(root: str | Path) -> list[Path]:
    """The complete (renamed) step folders under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(steps, reverse=True)]


def select(root: str | Path, skip: set[str] = frozenset(), warn: bool = True) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (None: there is none to resume). A newer
    invalid one is skipped with a one-line warning on stderr (when ``warn``); when there are some and
    none verifies, a :class:`CheckpointInvalid` names the newest one's bad file and the remedy."""
    problems: list[str] = []
    for folder in candidates(root):
        if folder.name in skip:
            problems.append(f"{folder}: failed to load")
            continue
        try:
            verify(folder)
        except CheckpointInvalid as e:
            problems.append(str(e))
            continue
        if problems and warn:
            print(f"distill: warning: {problems[0]}; resuming from the previous checkpoint {folder.name}",
                  file=sys.stderr, flush=True)
        return folder
    if problems:
        raise CheckpointInvalid(f"{problems[0]}; no valid checkpoint left in {root}: set distill.resume=false "
                                f"to train from scratch (or delete that folder)")
    return None


def latest(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies, or None (quiet; for messages)."""
    try:
        return select(root, warn=False)
    except CheckpointInvalid:
        return None


# --------------------------------------------------------------------------------------------
# Save / load (collective)
# --------------------------------------------------------------------------------------------


def save(root: str | Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict, rank: int, device: torch.device, keep: int = 2) -> Path:
    """Collective: every rank calls it. Keeps the ``keep`` newest checkpoints up to ``step`` (newer
    ones belong to an abandoned attempt, e.g. a corrupt one that a resume fell back from). Returns
    the final folder."""
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
    save_rng(rng_file(tmp, rank), device)
    _barrier()
    if rank == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state) + "\n")
        write_manifest(tmp)  # last: a folder with a matching manifest is complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        pointer.replace(root / LATEST)
        kept = [p for p in candidates(root) if step_of(p) <= step][:max(1, keep)]
        for old in root.glob("step-*"):
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _all_ok(ok: bool) -> bool:
    """Whether every rank is ok (a collective when distributed)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
         device: torch.device) -> dict:
    """Collective: restore weights, optimizer and this rank's RNG; returns the trainer state. A file
    that does not parse raises :class:`CheckpointInvalid` on every rank (the RNG file is checked by
    all ranks before anything is loaded; DCP passes a rank's read error to all)."""
    path = Path(path)
    error = None
    rng = None
    try:
        state = verify_state(path)
        if rng_file(path, rank).is_file():  # absent when resuming with more ranks than were saved
            rng = load_rng(rng_file(path, rank))
    except CheckpointInvalid as e:
        error = e
    if not _all_ok(error is None):
        raise error or CheckpointInvalid(f"{path}: unreadable on another rank (see its log)")
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_OPTIONS)
    sd = {"model": model_sd, "optim": optim_sd}
    try:
        with _single_process_ok():
            dcp.load(sd, checkpoint_id=str(path / "state"))
    except Exception as e:  # CheckpointException (any rank's read error), pickle errors in .metadata
        raise CheckpointInvalid(f"{path / 'state'}: unreadable ({first_line(e)})") from None
    set_state_dict(module, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_LOAD_OPTIONS)
    if rng is not None:
        set_rng(*rng, device)
    return state


def verify_state(path: Path) -> dict:
    """The trainer state of a checkpoint folder, parsed and checked for its keys."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        if not isinstance(state, dict) or any(k not in state for k in TRAINER_STATE_KEYS):
            raise ValueError("keys missing")
    except (OSError, ValueError) as e:
        raise CheckpointInvalid(f"{path / TRAINER_STATE}: unreadable ({first_line(e)})") from None
    return state
