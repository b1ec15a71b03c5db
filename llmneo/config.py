"""One typed configuration for every step: YAML presets + ``key=value`` overrides, validated.

    cfg = load_config("tiny", ["distill.alpha=0.9", "distill.max_steps=10"])

Presets live in ``configs/`` (installed as ``llmneo_presets``); a preset may also be a path to a YAML
file. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with a one-line
message naming the field, e.g. ``distill.alpha: must be <= 1, got 1.5``.

The same resolution (preset + overrides) runs in the CLI and inside every KFP component, so a
pipeline run is fully described by its two parameters ``preset`` and ``overrides``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from llmneo.errors import ConfigError, first_line
from llmneo.task_index import local_task_names, unknown_tasks

# data.max_length: the longest context of current open models (128k); more is a typo (an extra 0)
# that would otherwise surface as an out-of-memory error in the first training step
MAX_LENGTH = 131072
# registry.name / registry.aliases: they become object keys (llmneo.registry.core.NAME_RE is this)
REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_LIKE = re.compile(r"^v?(\d+)$")
# eval.thresholds entries: METRIC>=VALUE or METRIC<=VALUE
_THRESHOLD = re.compile(r"^\s*(?P<metric>[^<>=\s]+)\s*(?P<op>>=|<=)\s*(?P<value>\S+)\s*$")


def _f(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False, hi_open: bool = False, doc: str = "", factory: Any = None,
       mechanics: bool = False):
    """A dataclass field with a validated range and a one-line description. ``mechanics=True``: the
    field changes how a step runs, not what it computes (logging, checkpointing, process count,
    memory buffers), so it is left out of :meth:`Config.fingerprint`."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "doc": doc, "mechanics": mechanics}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    source: str = _f("builtin:tiny_instruct", doc="builtin:NAME | a JSONL/JSON/Parquet file or a folder of them | "
                     "a folder saved by datasets' save_to_disk | hf:DATASET_ID[@REVISION] | s3://bucket/prefix-or-key")
    subset: str = _f("", doc="with hf:ID: the dataset configuration/subset name (e.g. 7M for Infinity-Instruct)")
    split: str = _f("train", doc="with hf:ID or a saved DatasetDict: the split to read")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "turns", "prompt", "text"] = _f(
        "auto", doc="record format; auto = detected per record (messages > conversations > "
        "instruction/output > turns > prompt > text), counts per format in card.json")
    answers: Literal["given", "missing", "teacher"] = _f(
        "given", doc="given: train on the answers in the data (prompt-only records are rejected); missing: the "
        "teacher writes the answers records lack; teacher: the teacher writes every answer (sequence-level KD; "
        "see generate.* and docs/data.md)")
    chat_template: str = _f("", doc="'' = the student tokenizer's chat template; 'chatml'; or a Jinja template")
    max_length: int = _f(256, lo=8, hi=MAX_LENGTH, doc="max tokens per example (prompt + response)")
    truncation: Literal["truncate", "drop"] = _f("truncate", doc="what to do with longer examples")
    assistant_only_labels: bool = _f(True, doc="train only on assistant tokens (labels -100 elsewhere)")
    packing: bool = _f(False, doc="pack train examples into max_length rows (adds position_ids; see docs/data.md)")
    val_fraction: float = _f(0.1, lo=0.0, hi=1.0, lo_open=True, hi_open=True, doc="share of rows for validation")
    limit: int = _f(0, lo=0, doc="keep at most this many rows of the shuffled data (0 = all); "
                    "the same seed gives nested subsets")
    min_rows: int = _f(4, lo=1, doc="fail when fewer valid rows remain")
    dedup: bool = _f(True, doc="drop exact duplicates (after normalizing the format) as rejects")
    seed: int = _f(0, doc="shuffle/split seed")
    buffer_mb: float = _f(32.0, lo=0.0, lo_open=True, mechanics=True, doc="records held in memory before a "
                          "sorted run is spilled to disk (bounds prep memory; the output does not depend on it)")


@dataclass
class GenerateConfig:
    """The teacher writing the answers (data.answers=missing|teacher; llmneo/generate.py)."""

    engine: Literal["transformers"] = _f("transformers", doc="generation engine (transformers' generate)")
    max_new_tokens: int = _f(256, lo=1, doc="longest answer in tokens; an answer cut there is rejected "
                             "(truncated), not kept")
    temperature: float = _f(0.0, lo=0.0, doc="0 = greedy; > 0 samples at this temperature")
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True, doc="with temperature > 0: nucleus sampling mass")
    seed: int = _f(0, doc="sampling seed (each shard is seeded from it and its index: a resumed run "
                   "equals an uninterrupted one)")
    batch_size: int = _f(0, lo=0, doc="prompts per generate call; 0 = auto (8 on CPU; on CUDA sized to free "
                         "memory for the KV cache)")
    shard_prompts: int = _f(256, lo=1, doc="records per shard: a killed run resumes after the last finished shard")
    max_prompts: int = _f(0, lo=0, doc="answer at most this many records, the first ones of the source (0 = all)")
    samples: int = _f(3, lo=0, doc="generated answers shown in the step's card and the report")


@dataclass
class TinyModelConfig:
    """Shape of a random-init Llama built from config (tests, the `tiny` preset)."""

    hidden_size: int = _f(64, lo=8)
    num_layers: int = _f(2, lo=1)
    num_heads: int = _f(4, lo=1)
    num_kv_heads: int = _f(2, lo=1)
    intermediate_size: int = _f(128, lo=8)
    seed: int = _f(0)


@dataclass
class TeacherConfig:
    source: str = _f("tiny", doc="tiny | smollm2 | a local HF folder | hf:ID[@REV] | s3://bucket/prefix")
    tiny: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(num_layers=4, seed=1))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", doc="teacher weights dtype in training; auto = bf16 on GPU, fp32 on CPU")
    mode: Literal["online", "offline"] = _f(
        "online", doc="online: teacher forward in every step; offline: cache top-k logits once (teacher step)")
    topk: int = _f(64, lo=1, doc="with mode=offline: teacher logits kept per position")
    topk_dtype: Literal["float16", "bfloat16"] = _f("float16", doc="with mode=offline: log-prob storage dtype")
    topk_batch_size: int = _f(8, lo=1, doc="with mode=offline: sequences per teacher forward pass")


@dataclass
class StudentConfig:
    source: str = _f("tiny", doc="tiny | prune (depth-pruned copy of the teacher) | smollm2 | a local HF "
                     "folder | hf:ID[@REV] | s3://bucket/prefix")
    tiny: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(num_layers=2, seed=2))
    prune_keep_every: int = _f(2, lo=1, doc="with source=prune: keep layers 0, k, 2k, ... of the teacher")
    prune_layers: list[int] = _f(factory=list, doc="with source=prune: explicit teacher layer indices to keep, "
                                 "ascending, negative = from the end (overrides prune_keep_every)")


@dataclass
class DistillConfig:
    """The trainer (llmneo/trainer.py). See docs/distillation.md for what each knob trades."""

    method: Literal["sft", "lora", "kd", "neo"] = _f(
        "neo", doc="sft: full CE; lora: LoRA CE; kd: full CE+KD; neo: LoRA CE+KD (base frozen)")
    alpha: float = _f(0.5, lo=0.0, hi=1.0, doc="loss = (1-alpha)*CE + alpha*T^2*D(teacher||student)")
    temperature: float = _f(1.0, lo=0.0, lo_open=True, doc="KD softmax temperature T")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = _f("forward_kl", doc="D in the KD term")
    jsd_beta: float = _f(0.5, lo=0.0, hi=1.0,
                         doc="beta of the generalized JSD (exactly 0 = forward KL, exactly 1 = reverse KL; "
                             "near 0 or 1 the JSD shrinks ~β-fold, e.g. 0.001 → ~1000× smaller KD)")
    topk_tail: Literal["tail", "renormalize"] = _f(
        "tail", doc="offline teacher (teacher.mode=offline): mass outside the cached top-k is one extra "
        "'tail' bucket, or dropped with both distributions renormalized over the top-k")
    lora_variant: Literal["lora", "dora", "rslora", "moslora"] = _f(
        "lora", doc="lora | dora | rslora (peft) | moslora (trainable r x r mixer between A and B)")
    lora_rank: int = _f(8, lo=1, doc="LoRA rank r (paper: 64-128 at 1B scale; larger r wants lower lr)")
    lora_alpha: float = _f(16.0, lo=0.0, lo_open=True, doc="LoRA alpha (usually 2*r)")
    lora_dropout: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, doc="LoRA dropout")
    lora_targets: str = _f("all-linear", doc="'all-linear' or comma-separated module names")
    max_steps: int = _f(4, lo=0, doc="optimizer steps (0 = distill.epochs decides); see docs/configuration.md "
                        "'Training length'")
    epochs: float = _f(0.0, lo=0.0, doc="passes over the train split, rounded up to whole optimizer steps; used "
                       "when max_steps is 0 (setting one in an override or preset clears the other)")
    eval_every: int = _f(0, lo=0, mechanics=True, doc="validation loss on the val split every N optimizer steps "
                         "and after the last one (0 = off); train_log.jsonl key val_loss")
    lr: float = _f(2e-4, lo=0.0, hi=1.0, lo_open=True, doc="peak learning rate (paper: 2e-4 LoRA/NEO, 2e-5 full)")
    weight_decay: float = _f(0.0, lo=0.0)
    warmup_ratio: float = _f(0.1, lo=0.0, hi=1.0, hi_open=True, doc="linear warmup share, then cosine")
    global_batch_size: int = _f(8, lo=1, doc="sequences per optimizer step, whatever the world size")
    micro_batch_size: int | Literal["auto"] = _f(2, lo=1, doc=(
        "sequences per forward pass per process; auto: on CUDA the largest that divides the per-process batch "
        "and fits distill.max_memory_gib (probe steps at start), on CPU 2; the chosen value is on the card"))
    max_memory_gib: float = _f(0.0, lo=0.0, doc="with micro_batch_size=auto: the GPU memory budget per process "
                               "(0 = 90% of the device's memory)")
    max_grad_norm: float = _f(1.0, lo=0.0, doc="gradient clipping (0 = off)")
    loss_chunk_tokens: int = _f(512, lo=1, doc="tokens per CE/KD chunk (bounds fp32 logits memory)")
    loss_impl: Literal["chunked", "naive"] = _f(
        "chunked", doc="chunked: bounded logits memory; naive: full-vocabulary fp32 logits (reference/benchmark)")
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto", doc="auto: bf16 autocast on GPU, fp32 on CPU (master weights and optimizer stay fp32)")
    frozen_dtype: Literal["auto", "bf16", "fp32"] = _f(
        "auto", doc="lora/neo: dtype of the frozen base weights; auto = bf16 when training in bf16 with ddp "
        "(half the base's memory, no per-step weight casts), else fp32. The trainable weights stay fp32")
    compile: Literal["auto", True, False] = _f(
        "auto", doc="torch.compile each student decoder layer (regional: compile time of one layer); auto = on "
        "for CUDA, off on CPU")
    activation_checkpointing: bool = _f(False, doc="recompute decoder-layer activations in backward (less memory)")
    strategy: Literal["ddp", "fsdp"] = _f(
        "ddp", doc="ddp: replicate the student; fsdp: shard it per decoder layer (FSDP2 fully_shard)")
    save_every: int = _f(50, lo=0, mechanics=True, doc="checkpoint every N optimizer steps (0 = only on SIGTERM/SIGINT)")
    keep_checkpoint: bool = _f(False, mechanics=True, doc="keep checkpoint/ after a successful run (default: removed)")
    checkpoint_uri: str = _f("", mechanics=True, doc=(
        "folder for the checkpoints (empty: checkpoint/ in the output folder). Give one that outlives "
        "the step's pod (the pipeline sets /cache/checkpoints/<run id>/<config fingerprint> on the cache "
        "volume), so a retried step resumes"))
    keep_last_checkpoints: int = _f(2, lo=1, mechanics=True, doc="checkpoints kept while training (the newest "
                                    "that verifies is resumed: a corrupt newest one falls back to the previous)")
    max_nonfinite_steps: int = _f(0, lo=0, mechanics=True, doc="optimizer steps with a non-finite loss or gradient "
                                  "norm that are skipped (not applied) before training stops; 0 = stop at the first")
    resume: bool = _f(True, mechanics=True, doc="resume from checkpoint/ in the output folder (or skip a run already complete "
                      "there); false: train from scratch")
    nproc_per_node: int = _f(2, lo=1, mechanics=True, doc="torchrun processes per node (GPUs per node on a cluster)")
    nnodes: int = _f(1, lo=1, mechanics=True, doc="nodes; >1 runs on the distributed engine (see docs/pipeline.md)")
    seed: int = _f(0)
    log_every: int = _f(1, lo=1, mechanics=True, doc="write every N-th step to train_log.jsonl")

    def total_steps(self, train_rows: int) -> int:
        """Optimizer steps of the run on a train split of ``train_rows`` rows: ``max_steps`` when set,
        else ``epochs`` passes rounded up to whole global batches."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.epochs * train_rows / self.global_batch_size - 1e-9))

    def length_line(self, train_rows: int) -> str:
        """What the run amounts to, e.g. ``8 steps x 16 sequences = 0.46 epochs of 276 rows``."""
        steps = self.total_steps(train_rows)
        epochs = steps * self.global_batch_size / max(1, train_rows)
        return (f"{steps} steps × {self.global_batch_size} sequences = {epochs:.2f} epochs of "
                f"{train_rows} train rows")


@dataclass
class EvalConfig:
    # merge
    max_shard_size: str = _f("2GB", mechanics=True, doc="merged model: safetensors shard size (save_pretrained max_shard_size)")
    merged_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", doc="merged model weights dtype; auto = the base student's dtype (merge itself runs in fp32)")
    max_merge_loss: float = _f(0.01, lo=0.0, doc=(
        "merged_dtype below fp32: the largest share of the distillation's KL gain (base student -> adapter "
        "model, val split) that rounding the merged weights may lose (0.01 = 1%); above it, merge_fallback"))
    merge_fallback: Literal["fp32", "fail"] = _f("fp32", doc=(
        "when rounding loses more than max_merge_loss: fp32 = save the merged model in float32 instead; "
        "fail = keep merged_dtype and fail the gate"))
    # fidelity to the teacher (val split)
    batch_size: int = _f(4, lo=1, doc="val sequences per forward pass (fidelity)")
    max_batches: int = _f(0, lo=0, doc="cap on validation batches (0 = all)")
    chunk_tokens: int = _f(256, lo=1, doc="positions per fp32 logits chunk in fidelity: ~8 x chunk x vocab x 4 bytes peak")
    # lm-eval
    lm_eval_tasks: list[str] = _f(factory=lambda: ["llmneo_mc", "llmneo_val_ppl"], doc=(
        "lm-eval tasks: the repo's offline tasks (llmneo_mc, llmneo_val_ppl) and/or standard names "
        "(arc_easy, arc_challenge, piqa, winogrande, hellaswag, mmlu; these need hub access); [] = none"))
    lm_eval_models: list[str] = _f(factory=lambda: ["base_student", "distilled", "teacher"], doc=(
        "which models lm-eval runs on (distilled always); base_student/teacher give the side-by-side"))
    lm_eval_limit: int = _f(0, lo=0, doc="lm-eval: at most this many documents per task (0 = all)")
    lm_eval_num_fewshot: int = _f(-1, lo=-1, doc="lm-eval few-shot examples (-1 = each task's default)")
    lm_eval_batch_size: int = _f(32, lo=1, doc="lm-eval batch size (requests per forward pass)")
    # sample generations in the report
    samples: int = _f(4, lo=0, doc="report: greedy generations of every model on the first N val prompts (0 = none)")
    sample_new_tokens: int = _f(48, lo=1, doc="report: new tokens per sample generation")
    # gate: every threshold must hold for the DAG to register the model
    max_kl_to_teacher: float = _f(1e6, lo=0.0, doc="gate: register only if KL(teacher||student) <= this")
    max_perplexity: float = _f(1e9, lo=0.0, lo_open=True, doc="gate: register only if val perplexity <= this")
    min_top1_agreement: float = _f(0.0, lo=0.0, hi=1.0, doc="gate: register only if top-1 agreement with the teacher >= this")
    min_mc_accuracy: float = _f(0.0, lo=0.0, hi=1.0, doc="gate: register only if llmneo_mc accuracy >= this (0 = off)")
    thresholds: list[str] = _f(factory=list, doc=(
        "gate: extra 'METRIC>=VALUE' / 'METRIC<=VALUE' rules on eval.json metrics, e.g. 'arc_easy/acc_norm>=0.4'"))
    # the relative gate (on by default): distilling must have helped, measured against the base student
    gate_vs_base: bool = _f(True, doc=(
        "gate: also compare with the base student (eval.min_kl_reduction, eval.max_task_drop)"))
    min_kl_reduction: float = _f(0.1, lo=-10.0, hi=1.0, hi_open=True, doc=(
        "gate: distilled KL to the teacher <= base student's × (1 - this); 0.1 = at least 10% lower"))
    max_task_drop: float = _f(0.05, lo=0.0, doc=(
        "gate: no lm-eval score (acc, acc_norm, exact_match, f1, mc1, mc2) may fall more than this below "
        "the base student's"))


@dataclass
class RegistryConfig:
    uri: str = _f("runs/registry", doc="registry root: a local folder or s3://bucket/prefix "
                  "(llmneo registry also takes --registry or $LLMNEO_REGISTRY)")
    name: str = _f("llmneo-student", doc="model name in the registry")
    aliases: list[str] = _f(factory=lambda: ["latest"], doc="aliases pointed at the new version")
    multipart_threshold_mb: int = _f(64, lo=5, doc="S3: files larger than this upload in parts")
    multipart_chunk_mb: int = _f(64, lo=5, doc="S3: part size (S3 minimum 5 MiB)")
    max_concurrency: int = _f(8, lo=1, doc="S3: parallel part uploads/downloads per file")
    kubeflow_url: str = _f("", doc="also register in this Kubeflow Model Registry "
                           "(e.g. https://model-registry.kubeflow.svc:8443); empty = off")
    kubeflow_author: str = _f("llmneo", doc="Kubeflow Model Registry: author/owner of registered versions")


@dataclass
class ClusterConfig:
    """Multi-node distillation (distill.nnodes > 1) on Kubeflow Trainer: see llmneo/cluster.py."""

    namespace: str = _f("", doc="namespace of the TrainJob ('' = the launcher pod's own namespace)")
    runtime: str = _f("torch-distributed", doc="Kubeflow Trainer ClusterTrainingRuntime the TrainJob uses")
    image: str = _f("", doc="image of the training nodes ('' = $LLMNEO_IMAGE, the distill component's image)")
    staging_uri: str = _f("", doc="s3://bucket/prefix where the launcher stages inputs and nodes write the "
                          "adapter (required when distill.nnodes > 1)")
    gpu_resource: str = _f("nvidia.com/gpu", doc="resource requested per node (distill.nproc_per_node of "
                           "them) when the KFP task forwards no resources")
    timeout_hours: float = _f(72.0, lo=0.0, lo_open=True, doc="TrainJob deadline; the launcher gives up then")
    poll_seconds: float = _f(10.0, lo=0.0, lo_open=True, doc="status polling interval of the launcher")
    keep_job: bool = _f(False, doc="keep the finished TrainJob and staged files (debugging)")


@dataclass
class CompareConfig:
    """`llmneo compare` (llmneo/compare.py): the LLM-NEO paper's comparison of methods on one setting. Each
    method is the preset's distill section with distill.method=<method> and its learning rate below;
    neo's is distill.lr (the preset's own NEO run)."""

    methods: list[Literal["base", "sft", "lora", "kd", "neo"]] = _f(
        factory=lambda: ["base", "sft", "lora", "kd", "neo"], doc=(
        "what to compare: base (the student untouched), sft, lora, kd, neo; each trained with the "
        "preset's distill section, same data/steps/seed"))
    seeds: list[int] = _f(factory=lambda: [0], doc="distill.seed values: every method runs once per seed "
                          "(data order, LoRA init); the table shows the mean and the spread")
    lr_sft: float = _f(2e-5, lo=0.0, hi=1.0, lo_open=True, doc="learning rate of sft (paper: 2e-5 for full-parameter training)")
    lr_lora: float = _f(2e-4, lo=0.0, hi=1.0, lo_open=True, doc="learning rate of lora (paper: 2e-4, as NEO)")
    lr_kd: float = _f(2e-5, lo=0.0, hi=1.0, lo_open=True, doc="learning rate of kd (paper: 2e-5, as full SFT)")
    lm_eval_tasks: list[str] = _f(factory=lambda: ["llmneo_mc"], doc=(
        "lm-eval tasks of the comparison (fidelity to the teacher is always measured)"))


# what a trained student depends on (the trainer's resume check; compare adds eval for its runs)
FINGERPRINT_SECTIONS = ("data", "teacher", "student", "distill")


def result_fields(section: Any) -> dict[str, Any]:
    """A config section as a dict without its ``mechanics`` fields (nested sections likewise)."""
    out = {}
    for f in dataclasses.fields(section):
        if f.metadata.get("mechanics"):
            continue
        value = getattr(section, f.name)
        out[f.name] = result_fields(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def _digest(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Config:
    name: str = _f("tiny", doc="preset/run name")
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Content hash of the whole resolved configuration, run mechanics included (lineage: exactly
        what ran). What a *result* depends on is :meth:`fingerprint`."""
        return _digest(self.to_dict())

    def fingerprint(self, sections: tuple[str, ...] = FINGERPRINT_SECTIONS, extra: dict | None = None) -> str:
        """What a result computed from ``sections`` depends on: their values without the fields tagged
        ``mechanics`` (logging, checkpointing, process counts, ...), plus ``extra`` (e.g. the dataset
        hash). The one rule behind the trainer's resume check and compare's reuse of a run."""
        return _digest({**{name: result_fields(getattr(self, name)) for name in sections}, **(extra or {})})

    def check(self) -> Config:
        """Cross-field checks that a single field's type/range cannot express."""
        d = self.distill
        if d.max_steps > 0 and d.epochs > 0:
            raise ConfigError(f"distill.epochs: set either distill.max_steps ({d.max_steps}) or distill.epochs "
                              f"({d.epochs:g}), not both; set the other to 0")
        if d.max_steps == 0 and d.epochs == 0:
            raise ConfigError("distill.max_steps: set distill.max_steps or distill.epochs (both are 0)")
        if d.micro_batch_size != "auto" and d.global_batch_size % d.micro_batch_size:
            raise ConfigError(
                f"distill.global_batch_size: must be a multiple of distill.micro_batch_size "
                f"({d.micro_batch_size}), got {d.global_batch_size}")
        if "://" in d.checkpoint_uri:  # checkpoints are written to a file system
            raise ConfigError(f"distill.checkpoint_uri: must be a folder (e.g. on a volume such as the cache "
                              f"PVC), not a URI, got {d.checkpoint_uri!r}")
        if self.teacher.tiny.hidden_size % self.teacher.tiny.num_heads:
            raise ConfigError("teacher.tiny.hidden_size: must be divisible by teacher.tiny.num_heads")
        if self.student.tiny.hidden_size % self.student.tiny.num_heads:
            raise ConfigError("student.tiny.hidden_size: must be divisible by student.tiny.num_heads")
        self._check_values()
        return self

    def _check_values(self) -> None:
        """Values that used to be checked only by the step using them, hours into a run."""
        if not self.data.source.strip():
            raise ConfigError("data.source: empty; give builtin:NAME, a file or folder, hf:ID or s3://bucket/prefix")
        for key, value in (("teacher.source", self.teacher.source), ("student.source", self.student.source)):
            if not value.strip():
                raise ConfigError(f"{key}: empty; give tiny, smollm2, a model folder, hf:ID or s3://bucket/prefix")
        for i, rule in enumerate(self.eval.thresholds):
            parse_threshold(rule, f"eval.thresholds[{i}]")
        if not REGISTRY_NAME.match(self.registry.name):
            raise ConfigError(f"registry.name: {self.registry.name!r} must match {REGISTRY_NAME.pattern}")
        for i, alias in enumerate(self.registry.aliases):
            if not REGISTRY_NAME.match(alias) or _VERSION_LIKE.match(alias):
                raise ConfigError(f"registry.aliases[{i}]: {alias!r} must match {REGISTRY_NAME.pattern} "
                                  f"and not look like a version")
        for key, tasks in (("eval.lm_eval_tasks", self.eval.lm_eval_tasks),
                           ("compare.lm_eval_tasks", self.compare.lm_eval_tasks)):
            unknown = unknown_tasks(tasks)
            if unknown:
                raise ConfigError(f"{key}: unknown task(s) {', '.join(unknown)}; repo tasks: "
                                  f"{', '.join(sorted(local_task_names()))}, or an installed lm-eval task/group name")


def parse_threshold(rule: str, key: str = "eval.thresholds") -> tuple[str, str, float]:
    """``"arc_easy/acc_norm>=0.4"`` → ("arc_easy/acc_norm", ">=", 0.4); a malformed rule is a ConfigError."""
    m = _THRESHOLD.match(rule)
    value = None
    if m:
        try:
            value = float(m["value"])
        except ValueError:
            value = None
    if value is None or value != value:  # NaN would make every comparison fail silently
        raise ConfigError(f"{key}: {rule!r} is not METRIC>=VALUE or METRIC<=VALUE")
    return m["metric"], m["op"], value


# --------------------------------------------------------------------------------------------
# Building from dicts with validation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(path: str, tp: Any, value: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) > 1:  # e.g. int | Literal["auto"]: the first that accepts the value
            for alternative in rest:
                try:
                    return _coerce(path, alternative, value, meta)
                except ConfigError:
                    pass
            raise ConfigError(f"{path}: must be {_type_name(tp)}, got {value!r}")
        (tp,) = rest
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a mapping, got {type(value).__name__}")
        return _build(tp, value, path + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # "a,b,c" from a key=value override
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: must be {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(f"{path}[{i}]", inner, v, {}) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
    if tp in (int, float):
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
            raise ConfigError(f"{path}: must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value}")
        if hi is not None and (value >= hi if meta.get("hi_open") else value > hi):
            raise ConfigError(f"{path}: must be {'<' if meta.get('hi_open') else '<='} {hi}, got {value}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = [prefix + c for c in difflib.get_close_matches(str(key), fields, n=1)]
            # a bare leaf name (alpha=0.9) names a key of some section: suggest the full key
            close = close or _leaf_matches(str(key), cls, prefix)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # a partial nested section keeps the section's own defaults for the keys it leaves out
            value = _deep_merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(prefix + key, hints[key], value, dict(fields[key].metadata))
    return cls(**kwargs)


def _leaf_matches(name: str, cls: type, prefix: str) -> list[str]:
    """Full keys under ``cls`` whose last part is ``name`` (or, failing that, close to it)."""
    keys = [k for k, *_ in describe_fields(cls, prefix)]
    exact = [k for k in keys if k.rsplit(".", 1)[-1] == name]
    if exact:
        return exact[:3]
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    return [leaves[c] for c in difflib.get_close_matches(name, leaves, n=1)]


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"distill.alpha=0.9"`` → (["distill", "alpha"], 0.9). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. distill.alpha=0.9")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
        node[keys[-1]] = value
    return data


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("llmneo_presets").iterdir() if p.name.endswith(".yaml"))


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one,
    so a preset with ``alpha: 0.5`` … ``alpha: 0.9`` would silently run with 0.9)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1}, first on "
                    f"line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """``yaml.safe_load`` with duplicate keys refused (:class:`UniqueKeyLoader`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_error(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}"
    return str(e).splitlines()[0]


def _is_path(preset: str) -> bool:
    return preset.endswith((".yaml", ".yml")) or "/" in preset or "\\" in preset


def _preset_file(preset: str, relative_to: Path | None = None) -> Path:
    """The YAML file a path-like preset names (relative paths: to ``relative_to`` first, then the cwd)."""
    path = Path(preset).expanduser()
    if not path.is_absolute() and relative_to is not None and (relative_to / path).is_file():
        path = relative_to / path
    if not path.is_file():
        raise ConfigError(f"preset {preset}: file does not exist "
                          f"(give a YAML path or a shipped preset: {', '.join(preset_names())})")
    return path.resolve()


def read_preset(preset: str, _chain: tuple[str, ...] = (), _relative_to: Path | None = None) -> dict:
    """Raw dict of a preset (by name, or a path to a YAML file).

    A preset may extend another: ``base: smollm2-demo`` (a shipped name, or a YAML path resolved
    relative to the extending file's folder) is read first and the preset's own keys are merged over
    it, section by section (a list replaces the base's list). Cycles are an error.
    """
    if _is_path(preset):
        path = _preset_file(preset, _relative_to)
        identity, folder = str(path), path.parent
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"preset {preset}: cannot read ({e.strerror or first_line(e)})") from None
    else:
        res = resources.files("llmneo_presets").joinpath(f"{preset}.yaml")
        if not res.is_file():
            raise ConfigError(f"preset: unknown preset {preset!r}; known: {', '.join(preset_names())}")
        identity, folder, raw = preset, None, res.read_bytes()
    if identity in _chain:
        names = [Path(c).name for c in (*_chain, identity)]
        raise ConfigError(f"preset {preset}: base: cycle {' -> '.join(names)}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"preset {preset}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                          f"save the file as UTF-8") from None
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {preset}: not valid YAML ({_yaml_error(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {preset}: must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"preset {preset}: base: must be a preset name or YAML path, got {base!r}")
    inherited = read_preset(base, (*_chain, identity), folder)
    written = _set_length_keys(data)
    if len(written) == 1:  # the extending preset's training length replaces the base's (one choice)
        inherited = _one_training_length(inherited, written)
    return _deep_merge(inherited, data)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data).check()


LENGTH_KEYS = ("max_steps", "epochs")  # distill: one choice, two ways to say it


def _set_length_keys(layer: dict) -> set[str]:
    """Which of :data:`LENGTH_KEYS` a preset (or an override layer as a dict) sets under distill."""
    distill = layer.get("distill")
    return {k for k in LENGTH_KEYS if isinstance(distill, dict) and k in distill}


def _one_training_length(data: dict, written: set[str]) -> dict:
    """``distill.max_steps`` and ``distill.epochs`` are one choice: the layer written last that sets
    exactly one of them (overrides after the preset, the preset after the defaults) clears the other,
    so ``distill.epochs=2`` on a preset with ``max_steps: 30`` trains 2 epochs. A layer that sets both
    keeps both, and :meth:`Config.check` refuses two non-zero values."""
    if len(written) == 1:
        (other,) = set(LENGTH_KEYS) - written
        data.setdefault("distill", {})[other] = 0
    return data


def resolve_config(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset's (or a resolved configuration's) raw dict plus ``key=value`` overrides, validated."""
    data = _one_training_length(copy.deepcopy(data), _set_length_keys(data))
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    written = {keys[1] for keys, _ in map(parse_override, overrides)
               if len(keys) == 2 and keys[0] == "distill" and keys[1] in LENGTH_KEYS}
    return config_from_dict(_one_training_length(data, written))


REGISTRY_ENV = "LLMNEO_REGISTRY"


def load_config(preset: str = "tiny", overrides: list[str] | tuple[str, ...] | None = None) -> Config:
    """Resolve a preset and ``key=value`` overrides into a validated :class:`Config`.

    ``registry.uri``: an explicit ``registry.uri=…`` override, else ``$LLMNEO_REGISTRY``, else the
    preset's value, else the default ``runs/registry``.
    """
    data = read_preset(preset)
    if os.environ.get(REGISTRY_ENV):
        data = _deep_merge(data, {"registry": {"uri": os.environ[REGISTRY_ENV]}})
    return resolve_config(data, list(overrides or []))


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, description) for every leaf key: used by `llmneo config --keys`."""
    rows = []
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, val = hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, _type_name(tp), val, f.metadata.get("doc", "")))
    return rows


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
