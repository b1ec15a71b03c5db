"""Trainer checkpoints: save periodically and on SIGTERM, verify, resume exactly — without pickle.

Layout, in the checkpoint folder (``<distill output>/checkpoint``, or ``distill.checkpoint_uri``)::

    checkpoint/latest                   "step-000040"  (informational: resuming scans the step folders)
    checkpoint/step-000040/
        state.safetensors               trainable weights ("model/<name>") and AdamW state
                                        ("optim/<name>/exp_avg", ...), unsharded (gathered from FSDP
                                        shards on rank 0); the optimizer's param groups as JSON in the
                                        file's metadata
        trainer_state.json              step, data position, LR scheduler, log history, config hash, world
        rng/rank-00000.safetensors      each rank's torch / CUDA RNG states (tensors) and python's
                                        ``random`` state (JSON in the file's metadata)
        manifest.json                   SHA-256 and size of every file above, written last
    checkpoint/step-000030/             the previous one (``distill.keep_last_checkpoints``, default 2)

Only *trainable* tensors are saved: the adapter for lora/neo (the frozen base is reloaded from the
student artifact), everything for sft/kd. A folder is written as ``step-N.tmp`` and renamed when every
rank has finished and its manifest is written, so a checkpoint is either complete or absent. The state
is saved whole (any number of ranks can resume it) and each rank loads it and keeps its shard.

Nothing is unpickled: every file is safetensors or JSON, so a checkpoint folder on a volume that
others can write (the pipeline's cache volume) can make a resume fail, never run code. Resuming
(:func:`select`) takes the newest folder whose files match its manifest; a corrupt one (truncated
file, garbage, bad trainer state) is skipped with a one-line warning, and when none is valid the run
stops with one line naming the file and the remedy (``distill.resume=false``). :func:`load` raises
:class:`CheckpointInvalid` (a :class:`~llmneo.errors.UserError`) for anything it cannot read, on every
rank: the trainer then tries the previous checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from llmneo.errors import UserError, first_line
from llmneo.storage import sha256_file

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
STATE = "state.safetensors"
FORMAT = "llmneo-checkpoint/1"
TRAINER_STATE_KEYS = ("step", "scheduler", "history", "config_hash")
_STEP_DIR = re.compile(r"step-(\d+)")
# the sharded (FSDP: DTensor) trainable state: what this run expects a checkpoint to hold
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# saved whole, on rank 0's CPU
_SAVE_OPTIONS = StateDictOptions(ignore_frozen_params=True, full_state_dict=True, cpu_offload=True)
# loaded whole by every rank, each keeping its shard; the frozen base is left alone (not strict): that
# every trainable tensor is there is checked by :func:`_check_matches`
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, full_state_dict=True, strict=False)


class CheckpointInvalid(UserError):
    """A checkpoint folder that fails verification or loading; the message names the file."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


def select(root: str | Path, skip: set[str] | dict[str, str] = frozenset(), warn: bool = True) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (None: there is none to resume), leaving out
    the folder names in ``skip`` (a dict: with the reason each failed to load). A newer invalid one is
    skipped with a one-line warning on stderr (when ``warn``); when there are some and none verifies,
    a :class:`CheckpointInvalid` names the newest one's bad file and the remedy."""
    problems: list[str] = []
    for folder in candidates(root):
        if folder.name in skip:
            reason = skip.get(folder.name) if isinstance(skip, dict) else None
            problems.append(reason or f"{folder}: failed to load")
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
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_SAVE_OPTIONS)  # collective (FSDP)
    if rank == 0:
        save_state(tmp / STATE, model_sd, optim_sd)
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
    """Collective: restore weights, optimizer and this rank's RNG; returns the trainer state. Anything
    that does not read or does not match this run (a missing tensor, another shape) raises
    :class:`CheckpointInvalid` on every rank before anything is changed."""
    path = Path(path)
    error = None
    rng = None
    expected_model, expected_optim = get_state_dict(module, optimizer, options=_OPTIONS)
    try:
        state = verify_state(path)
        model_sd, optim_sd = load_state(path / STATE)
        _check_matches(path / STATE, model_sd, optim_sd, expected_model, expected_optim)
        if rng_file(path, rank).is_file():  # absent when resuming with more ranks than were saved
            rng = load_rng(rng_file(path, rank))
    except CheckpointInvalid as e:
        error = e
    if not _all_ok(error is None):
        raise error or CheckpointInvalid(f"{path}: unreadable on another rank (see its log)")
    set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_LOAD_OPTIONS)
    if rng is not None:
        set_rng(*rng, device)
    return state


# --------------------------------------------------------------------------------------------
# The state file: safetensors + JSON
# --------------------------------------------------------------------------------------------


def save_state(path: Path, model_sd: dict, optim_sd: dict) -> None:
    """Trainable weights and optimizer state (unsharded, as :func:`get_state_dict` gives them with
    ``full_state_dict``) as one safetensors file; what is not a tensor as JSON in its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        if t.numel() and t.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t

    for name, t in model_sd.items():
        put(f"model/{name}", t)
    scalars: dict[str, dict] = {}
    for name, entries in optim_sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                put(f"optim/{name}/{key}", value)
            else:
                scalars.setdefault(name, {})[key] = value
    metadata = {"format": FORMAT, "param_groups": json.dumps(optim_sd["param_groups"]),
                "optim_scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=metadata)


def load_state(path: Path) -> tuple[dict, dict]:
    """What :func:`save_state` wrote: (model state, optimizer state). Raises :class:`CheckpointInvalid`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            param_groups = json.loads(meta["param_groups"])
            scalars = json.loads(meta["optim_scalars"])
            model_sd: dict[str, torch.Tensor] = {}
            state: dict[str, dict] = {name: dict(entries) for name, entries in scalars.items()}
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                kind, _, rest = key.partition("/")
                if kind == "model":
                    model_sd[rest] = f.get_tensor(key)
                elif kind == "optim" and "/" in rest:
                    name, _, entry = rest.rpartition("/")
                    state.setdefault(name, {})[entry] = f.get_tensor(key)
                else:
                    raise ValueError(f"unexpected tensor {key!r}")
        if not isinstance(param_groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                         for g in param_groups):
            raise ValueError("bad param_groups")
    except CheckpointInvalid:
        raise
    except Exception as e:  # safetensors, JSON and key errors alike: the file is not what we wrote
        raise CheckpointInvalid(f"{path}: unreadable ({first_line(e)})") from None
    return model_sd, {"state": state, "param_groups": param_groups}


def _check_matches(path: Path, model_sd: dict, optim_sd: dict, expected_model: dict, expected_optim: dict) -> None:
    """Every tensor this run trains (weights and optimizer state) is in the file, with its shape and
    dtype (a DTensor's shape is the unsharded one), and the param groups name the same weights."""
    def check(name: str, got, want) -> None:
        if not isinstance(want, torch.Tensor):
            return
        if not isinstance(got, torch.Tensor):
            raise CheckpointInvalid(f"{path}: no tensor {name!r} (a checkpoint of another model?)")
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise CheckpointInvalid(f"{path}: {name!r} is {got.dtype} {tuple(got.shape)}, this run has "
                                    f"{want.dtype} {tuple(want.shape)}")

    for name, want in expected_model.items():
        check(f"model/{name}", model_sd.get(name), want)
    for name, entries in expected_optim["state"].items():
        for key, want in entries.items():
            check(f"optim/{name}/{key}", optim_sd["state"].get(name, {}).get(key), want)
    groups = [sorted(g["params"]) for g in optim_sd["param_groups"]]
    if groups != [sorted(g["params"]) for g in expected_optim["param_groups"]]:
        raise CheckpointInvalid(f"{path}: its optimizer param groups name other weights than this run's")


def verify_state(path: Path) -> dict:
    """The trainer state of a checkpoint folder, parsed and checked for its keys."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        if not isinstance(state, dict) or any(k not in state for k in TRAINER_STATE_KEYS):
            raise ValueError("keys missing")
    except (OSError, ValueError) as e:
        raise CheckpointInvalid(f"{path / TRAINER_STATE}: unreadable ({first_line(e)})") from None
    return state
