"""Typed cards: the contract between the pipeline steps, one class per artifact.

Every step's output folder holds a ``card.json`` written **last and atomically** (a temporary file
in the same folder, then ``os.replace``): its presence means the step completed. A step removes its
card before it writes anything else, so a failed re-run into a folder never leaves the previous
run's card behind (:func:`remove`).

    step           folder          card          KFP metrics
    generate       answers         AnswersCard   AnswersCard.step_metrics()
    prep           dataset         DatasetCard   DatasetCard.step_metrics()
    teacher        teacher         ModelCard     ModelCards(teacher, student).step_metrics()
                   student         ModelCard
    distill        adapter         DistillCard   DistillCard.step_metrics()
    merge-eval     model           EvalCard      EvalCard.step_metrics()
    register       (the registry)  manifest      register_metrics(manifest, seconds)

``step_metrics()`` is the one definition of a step's metric names: the KFP components log it and the
local run summary (``llmneo run``) reads it.

merge-eval writes two files: ``eval.json``, the full evaluation report (fidelity and lm-eval scores
of every model, read by reports and ``compare``), and then the :class:`EvalCard` — the completion
mark with what downstream steps need (the distilled model's metrics, the gate, the lineage hashes).
``register`` trusts only the card: an ``eval.json`` without it is an interrupted step.

Reading tolerates keys a card class does not know (kept in ``extra`` and written back unchanged),
so a card from a newer version still reads; a missing or garbled card is a one-line
:class:`~llmneo.errors.UserError` naming the file and the step that writes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from llmneo.errors import UserError

CARD = "card.json"

C = TypeVar("C", bound="Card")


def remove(folder: str | Path) -> None:
    """Drop a folder's card: a step calls this before writing anything, so the folder reads as
    incomplete until the step writes its new card last."""
    (Path(folder) / CARD).unlink(missing_ok=True)


def exists(folder: str | Path) -> bool:
    return (Path(folder) / CARD).is_file()


@dataclass
class Card:
    """Base: (de)serialization, atomic write, one-line errors. Subclasses declare their fields."""

    WHAT: ClassVar[str] = "artifact"
    STEP: ClassVar[str] = "its"  # the step that writes the card, and its command
    COMMAND: ClassVar[str] = "llmneo"
    KINDS: ClassVar[tuple[str, ...]] = ()

    kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- (de)serialization
    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict) -> C:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def write(self, folder: str | Path) -> C:
        """Write ``folder/card.json`` atomically (a reader sees the old card, none, or this one)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CARD}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / CARD)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self

    @classmethod
    def read(cls: type[C], folder: str | Path) -> C:
        """The card of a completed step's folder; a one-line UserError when it is missing or garbled."""
        path = Path(folder) / CARD
        rerun = f"the {cls.STEP} step writes it last: run `{cls.COMMAND}` into this folder"
        if not path.is_file():
            raise UserError(f"{folder}: no {CARD}, not a completed {cls.WHAT} ({rerun})")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{path}: unreadable {cls.WHAT} card: {str(e).splitlines()[0][:120]} ({rerun})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: not a {cls.WHAT} card: not a JSON object ({rerun})")
        if data.get("kind") not in cls.KINDS:
            raise UserError(f"{path}: a {data.get('kind')!r} card, not a {cls.WHAT} card ({rerun})")
        card = cls.from_dict(data)
        card.validate(path)
        return card

    def validate(self, path: Path) -> None:
        """Subclasses refuse cards that are the right kind but cannot be the right artifact."""


def _metric_name(name: str) -> str:
    """KFP metric names: letters, digits, ``_ . -`` (lm-eval names hold ``/`` and ``,``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --------------------------------------------------------------------------------------------
# Teacher-written answers (before prep)
# --------------------------------------------------------------------------------------------


@dataclass
class AnswersCard(Card):
    """The conversations answered by the teacher (``answers.jsonl``, ``rejects.jsonl``); with
    ``data.answers=given`` only this card, saying that prep reads ``data.source`` itself."""

    WHAT: ClassVar[str] = "answers"
    STEP: ClassVar[str] = "generate"
    COMMAND: ClassVar[str] = "llmneo generate"
    KINDS: ClassVar[tuple[str, ...]] = ("answers",)

    kind: str = "answers"
    answers: str = "given"  # data.answers: given | missing | teacher
    source: str | None = None
    source_info: dict = field(default_factory=dict)
    content_hash: str | None = None  # the source's (data_sources.Source.content_hash)
    formats: dict[str, int] = field(default_factory=dict)
    # read, rejected, kept, answered (records the teacher answered), passed_through (already complete)
    counts: dict[str, int] = field(default_factory=dict)
    rejected_by_kind: dict[str, int] = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)  # source, fingerprint
    generation: dict = field(default_factory=dict)  # every parameter the answers depend on
    generation_key: str | None = None  # digest of source content, teacher fingerprint and generation
    shards: dict[str, int] = field(default_factory=dict)  # total, reused, generated
    answers_generated: int = 0  # assistant turns written by the teacher
    new_tokens: int = 0  # their tokens (end-of-turn included), in the shards generated by this run
    seconds: float = 0.0
    prompts_per_second: float = 0.0
    tokens_per_second: float = 0.0
    samples: list[dict] = field(default_factory=list)  # {row, messages} of the first answered records
    answers_hash: str | None = None  # sha256 of answers.jsonl

    @property
    def generated(self) -> bool:
        return self.answers != "given"

    def step_metrics(self) -> dict[str, float]:
        m = {"seconds": self.seconds}
        if self.generated:
            m.update({f"rows_{k}": v for k, v in self.counts.items()})
            m.update({f"rejected_{k}": v for k, v in self.rejected_by_kind.items()})
            m.update({"answers_generated": self.answers_generated, "new_tokens": self.new_tokens,
                      "prompts_per_second": self.prompts_per_second, "tokens_per_second": self.tokens_per_second,
                      "shards_reused": self.shards.get("reused", 0), "shards_generated": self.shards.get("generated", 0)})
        return m

    def metadata(self) -> dict:
        return {"answers": self.answers, "generation_key": self.generation_key,
                "teacher_fingerprint": self.teacher.get("fingerprint"), "answers_hash": self.answers_hash}

    def summary_line(self) -> str:
        """The step's line in the local run summary (``llmneo run``)."""
        if not self.generated:
            return "answers given in the data (data.answers=given)"
        c, sh = self.counts, self.shards
        reuse = (f", {sh.get('reused', 0)} of {sh.get('total', 0)} shards reused" if sh.get("reused") else "")
        return (f"{c.get('answered', 0)} records answered by the teacher ({self.answers_generated} answers, "
                f"{self.tokens_per_second:.0f} tok/s), {c.get('rejected', 0)} rejected{reuse}")


# --------------------------------------------------------------------------------------------
# Step 1: prep
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetCard(Card):
    """The prepared dataset (``train.parquet``, ``val.parquet``, ``rejects.jsonl``)."""

    WHAT: ClassVar[str] = "dataset"
    STEP: ClassVar[str] = "prep"
    COMMAND: ClassVar[str] = "llmneo prep"
    KINDS: ClassVar[tuple[str, ...]] = ("dataset",)
    TOKEN_METRICS: ClassVar[tuple[str, ...]] = ("total", "label_tokens", "mean_length", "p50_length",
                                                "p99_length", "max_length", "truncated")

    kind: str = "dataset"
    source: str | None = None
    source_info: dict = field(default_factory=dict)
    content_hash: str | None = None
    formats: dict[str, int] = field(default_factory=dict)
    # read, rejected, kept, train, val, beyond_limit (rows the limit left unread)
    counts: dict[str, int] = field(default_factory=dict)
    rejected_by_kind: dict[str, int] = field(default_factory=dict)
    # total, label_tokens, mean/p50/p99/max_length, truncated, loss_positions {split: n}, ...
    tokens: dict = field(default_factory=dict)
    packing: dict | None = None
    tokenizer_fingerprint: str | None = None
    chat_template_hash: str | None = None
    max_length: int | None = None
    seed: int | None = None
    histogram: str | None = None
    seconds: float = 0.0
    rows_per_second: float = 0.0
    dataset_hash: str | None = None

    def loss_positions(self, split: str) -> int | None:
        """Positions that carry a label in ``split`` (sizes the top-k cache), if recorded."""
        return (self.tokens.get("loss_positions") or {}).get(split)

    def step_metrics(self) -> dict[str, float]:
        m = {"seconds": self.seconds, "rows_per_second": self.rows_per_second}
        m.update({f"rows_{k}": v for k, v in self.counts.items()})
        m.update({f"rejected_{k}": v for k, v in self.rejected_by_kind.items()})
        m.update({f"tokens_{k}": self.tokens[k] for k in self.TOKEN_METRICS if k in self.tokens})
        return m

    def metadata(self) -> dict:
        """The KFP artifact's metadata (shown in the UI, searchable in ML Metadata)."""
        return {"dataset_hash": self.dataset_hash, "source": self.source, "content_hash": self.content_hash,
                "tokenizer_fingerprint": self.tokenizer_fingerprint}

    def summary_line(self) -> str:
        """The step's line in the local run summary (``llmneo run``)."""
        m = self.step_metrics()
        return (f"{m.get('rows_train', 0):.0f} train / {m.get('rows_val', 0):.0f} val rows, "
                f"{m.get('rows_rejected', 0):.0f} rejected")


# --------------------------------------------------------------------------------------------
# Step 2: teacher (and the base student)
# --------------------------------------------------------------------------------------------


@dataclass
class ModelCard(Card):
    """A model artifact: the weights in the folder, or only this card whose ``ref`` says where they
    are (``hf:ID@COMMIT``, ``smollm2``, ``s3://…``, a local folder)."""

    WHAT: ClassVar[str] = "model"
    STEP: ClassVar[str] = "teacher"
    COMMAND: ClassVar[str] = "llmneo teacher"
    KINDS: ClassVar[tuple[str, ...]] = ("model",)

    kind: str = "model"
    role: str | None = None  # teacher, student
    source: str | None = None
    ref: str | None = None  # where the weights are when the folder holds only the card
    revision: str | None = None  # hub commit (hf: sources)
    content_hash: str | None = None  # local weights
    pruned_from: str | None = None
    kept_layers: list[int] | None = None
    architecture: str | None = None
    dtype: str | None = None
    parameters: int = 0
    layers: int = 0
    hidden_size: int | None = None
    vocab_size: int = 0
    tokenizer_size: int = 0
    tokenizer_fingerprint: str | None = None
    vocab_slice: dict | None = None  # teacher vocabulary larger than the student's
    topk: dict | None = None  # teacher.mode=offline: the top-k cache's summary
    seconds: float = 0.0

    def to_dict(self) -> dict:
        # optional facts appear only when they apply (as before the cards were typed)
        optional = ("ref", "revision", "content_hash", "pruned_from", "kept_layers", "vocab_slice", "topk")
        return {k: v for k, v in super().to_dict().items() if not (k in optional and v is None)}

    def role_metrics(self) -> dict[str, float]:
        m = {f"{self.role}_parameters": self.parameters, f"{self.role}_layers": self.layers}
        if self.topk:
            m.update({"topk_bytes": self.topk["bytes"], "topk_positions": self.topk["tokens"],
                      "topk_positions_per_second": self.topk["positions_per_second"]})
        return m

    def metadata(self) -> dict:
        meta = {"source": self.source, "dtype": self.dtype}
        if self.role == "teacher":
            meta["tokenizer_fingerprint"] = self.tokenizer_fingerprint
        return meta


@dataclass
class ModelCards:
    """What the teacher step returns: its two model cards."""

    teacher: ModelCard
    student: ModelCard

    @property
    def seconds(self) -> float:
        return self.teacher.seconds

    def step_metrics(self) -> dict[str, float]:
        return {"seconds": self.seconds, **self.teacher.role_metrics(), **self.student.role_metrics()}

    def to_dict(self) -> dict:
        return {"teacher": self.teacher.to_dict(), "student": self.student.to_dict(), "seconds": self.seconds}

    def summary_line(self) -> str:
        """The step's line in the local run summary (``llmneo run``)."""
        m = self.step_metrics()
        return (f"teacher {m['teacher_parameters'] / 1e6:.2f}M params, "
                f"student {m['student_parameters'] / 1e6:.2f}M")


# --------------------------------------------------------------------------------------------
# Step 3: distill
# --------------------------------------------------------------------------------------------


@dataclass
class DistillCard(Card):
    """A finished training run: ``adapter/`` (lora, neo; kind ``adapter``) or ``model/`` (sft, kd;
    kind ``model``), ``train_log.jsonl``, ``loss_curve.png``."""

    WHAT: ClassVar[str] = "distill output"
    STEP: ClassVar[str] = "distill"
    COMMAND: ClassVar[str] = "llmneo distill"
    KINDS: ClassVar[tuple[str, ...]] = ("adapter", "model")

    kind: str = "adapter"
    status: str | None = None  # "complete"
    method: str | None = None
    steps: int = 0
    world_size: int = 1
    strategy: str | None = None
    global_batch_size: int | None = None
    micro_batch_size: int | None = None  # per process, as chosen (distill.micro_batch_size=auto)
    alpha: float | None = None
    temperature: float | None = None
    divergence: str | None = None
    teacher_mode: str | None = None
    topk_tail: str | None = None
    lora_variant: str | None = None
    lora_rank: int | None = None
    trainable_parameters: int = 0
    final: dict[str, float] = field(default_factory=dict)  # loss, ce, kd of the last step
    tokens_per_s: float = 0.0
    peak_mem_mb: float | None = None
    seconds: float = 0.0  # training steps only
    resumed_from_step: int | None = None
    nonfinite_steps_skipped: int = 0  # steps whose non-finite loss/gradient was not applied
    loss_curve: str | None = None
    dataset_hash: str | None = None
    config_hash: str | None = None
    wall_seconds: float | None = None  # the whole step (launch, load, save), set by its launcher
    val_loss: float | None = None  # the last validation loss (distill.eval_every), None when off
    val_history: list[dict] = field(default_factory=list)  # {step, val_loss, val_ce[, val_kd]} per validation

    def validate(self, path: Path) -> None:
        if self.method is None:  # a sft/kd distill card and a model card share kind "model"
            raise UserError(f"{path}: not a {self.WHAT} card: no method (the {self.STEP} step writes it)")

    def complete_for(self, config_hash: str) -> bool:
        return self.status == "complete" and self.config_hash == config_hash

    def step_metrics(self) -> dict[str, float]:
        m = {"seconds": self.wall_seconds if self.wall_seconds is not None else self.seconds}
        m.update({f"final_{k}": v for k, v in self.final.items()})
        m.update({"tokens_per_s": self.tokens_per_s, "trainable_parameters": self.trainable_parameters})
        if self.val_loss is not None:
            m["final_val_loss"] = self.val_loss
        return m

    def metadata(self) -> dict:
        return {"method": self.method, "steps": self.steps}

    def summary_line(self) -> str:
        """The step's line in the local run summary (``llmneo run``)."""
        m = self.step_metrics()
        nan = float("nan")
        terms = (f" (ce {m.get('final_ce', nan):.4f}, kd {m.get('final_kd', nan):.4f})"
                 if self.alpha and self.teacher_mode else "")
        val = f", val loss {self.val_loss:.4f}" if self.val_loss is not None else ""
        return (f"{self.steps} steps, final loss {m.get('final_loss', nan):.4f}{terms}{val}, "
                f"{m['tokens_per_s']:.0f} tok/s")


# --------------------------------------------------------------------------------------------
# Step 4: merge-eval
# --------------------------------------------------------------------------------------------


@dataclass
class EvalCard(Card):
    """The merged, evaluated model (weights, ``eval.json``, report.md/html, README.md model card).

    Its on-disk kind is ``model`` (role ``distilled``): the folder is a loadable model artifact."""

    WHAT: ClassVar[str] = "merge-eval output"
    STEP: ClassVar[str] = "merge-eval"
    COMMAND: ClassVar[str] = "llmneo merge-eval"
    KINDS: ClassVar[tuple[str, ...]] = ("model",)

    kind: str = "model"
    role: str = "distilled"
    method: str | None = None
    teacher: str | None = None
    student: str | None = None
    dataset_hash: str | None = None
    config_hash: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the distilled model's flat metrics
    gate: dict = field(default_factory=dict)  # passed, reasons, thresholds
    # every evaluated model's flat metrics (base_student, distilled, teacher…); absent in older cards
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    # the merge's precision check (eval.json "merge"): requested/saved dtype, kl_base, kl_adapter,
    # kl_rounded, gain_lost, max_gain_lost, action; absent in older cards
    merge: dict = field(default_factory=dict)
    seconds: float = 0.0
    # SHA-256 of every weight file evaluated (path relative to the folder → hex): register recomputes
    # them, so the metrics are registered only with the weights they were measured on
    weights: dict[str, str] = field(default_factory=dict)

    def validate(self, path: Path) -> None:
        if self.role != "distilled" or not isinstance(self.gate, dict) or "passed" not in self.gate:
            raise UserError(f"{path}: not a {self.WHAT} card: no gate result (the {self.STEP} step writes it)")

    @property
    def passed(self) -> bool:
        return self.gate.get("passed") is True

    def step_metrics(self) -> dict[str, float]:
        m = {"seconds": self.seconds, "gate_passed": 1.0 if self.passed else 0.0}
        for name, row in (self.summary or {"distilled": self.metrics}).items():
            m.update({_metric_name(f"{name}_{key}"): float(value) for key, value in row.items()})
        for key in ("gain_lost", "kl_adapter", "kl_rounded"):  # share of the KL gain the saved dtype lost
            if isinstance((self.merge or {}).get(key), (int, float)):
                m[f"merge_{key}"] = float(self.merge[key])
        return m

    def summary_line(self) -> str:
        """The step's line in the local run summary (``llmneo run``)."""
        m, nan = self.step_metrics(), float("nan")
        return (f"KL to teacher {m.get('base_student_kl_to_teacher', nan):.4f} (base) → "
                f"{m.get('distilled_kl_to_teacher', nan):.4f}; gate "
                + ("pass" if self.passed else "FAIL: " + "; ".join(self.gate.get("reasons", []))))

    def check_weights(self, folder: str | Path) -> None:
        """Refuse (one line naming the file) weights that differ from those merge-eval evaluated:
        a file changed, added or removed since the card was written."""
        folder = Path(folder)
        if not self.weights:
            raise UserError(f"{folder}: the merge-eval card records no weight digests (an older merge-eval "
                            f"wrote it); re-run merge-eval on these weights")
        now = weight_digests(folder)
        for path, digest in sorted(self.weights.items()):
            if path not in now:
                raise UserError(f"{folder}: {path}, evaluated by merge-eval, is missing; not registered")
            if now[path] != digest:
                raise UserError(f"{folder}: {path} differs from the weights merge-eval evaluated (sha256 "
                                f"{now[path][:16]}…, the card says {str(digest)[:16]}…); not registered: run "
                                f"merge-eval on these weights")
        extra = sorted(set(now) - set(self.weights))
        if extra:
            raise UserError(f"{folder}: {extra[0]} was not evaluated by merge-eval (a weight file added after "
                            f"it); not registered")

    def metadata(self) -> dict:
        return {"gate": "pass" if self.passed else "fail",
                **{_metric_name(k): v for k, v in self.metrics.items()}}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # what a loader could read weights from


def weight_digests(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every weight file under ``folder`` (``*.safetensors``, ``*.bin``, …), by relative path."""
    from llmneo.storage import sha256_file

    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}


# --------------------------------------------------------------------------------------------
# Step 5: register (its record is the registry manifest, not a card)
# --------------------------------------------------------------------------------------------


def register_metrics(manifest: dict, seconds: float) -> dict[str, float]:
    return {"seconds": round(seconds, 2), "files": len(manifest["files"]),
            "bytes": sum(f["size"] for f in manifest["files"]),
            "reused_existing_version": 1.0 if manifest.get("reused") else 0.0}
