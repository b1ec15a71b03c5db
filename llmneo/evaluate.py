"""Merge the adapter into the base student, then evaluate: fidelity to the teacher and lm-eval tasks.

    from llmneo.evaluate import evaluate_models
    result = evaluate_models({"base": "runs/x/student", "neo": "runs/x/model"}, "runs/x/teacher",
                             "runs/x/dataset", cfg)
    result["summary"]["neo"]   # {"kl_to_teacher": …, "top1_agreement": …, "perplexity": …, "llmneo_mc/acc": …}

Fidelity (per target token of the val split, next-token positions as in training):
``kl_to_teacher`` = mean KL(teacher‖model), ``top1_agreement`` = share of positions where the model's
argmax equals the teacher's, ``perplexity`` = exp(mean CE on the labels). Logits are computed from the
final hidden states ``chunk_tokens`` positions at a time, so a 128k vocabulary never needs a full
``[B, L, V]`` fp32 tensor.

lm-eval (0.4.x, Python API, ``HFLM`` around the in-memory model): the repo's offline tasks in
``llmneo/tasks/`` (``llmneo_mc`` multiple choice, ``llmneo_val_ppl`` held-out perplexity on the val
split) and/or standard task names (arc_easy, mmlu, …) when the hub is reachable.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llmneo import cards
from llmneo.cards import DatasetCard, DistillCard, EvalCard, ModelCard, weight_digests
from llmneo.config import Config, parse_threshold
from llmneo.data import collate, read_split
from llmneo.data_output import IGNORE_INDEX
from llmneo.errors import UserError
from llmneo.heads import check_logits_head, logits_head
from llmneo.lora import merge_adapter  # the one place adapters are merged (peft LoRA variants, MoSLoRA)
from llmneo.losses import divergence, shift_mask
from llmneo.models import load_causal_lm, load_tokenizer, model_location
from llmneo.task_index import TASK_DIR, local_task_names

FIDELITY_KEYS = ("kl_to_teacher", "top1_agreement", "perplexity")
MC_TASK = "llmneo_mc"
VAL_PPL_TASK = "llmneo_val_ppl"


def eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eval_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on GPU (logits are upcast per chunk), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


def _saved_dtype(location: str) -> torch.dtype:
    """The dtype a model folder's config.json declares (fp32 when it says nothing)."""
    config = json.loads((Path(location) / "config.json").read_text()) if (Path(location) / "config.json").is_file() else {}
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def merge_fp32(student_artifact: str | Path, distill_dir: str | Path):
    """Base student + adapter (or the fully trained model of sft/kd), merged in fp32: (model, tokenizer).
    The fp32 merge is the adapter model itself (up to fp32 rounding)."""
    distill_dir = Path(distill_dir)
    tokenizer = load_tokenizer(model_location(student_artifact)[0])
    if (distill_dir / "adapter").is_dir():
        base = load_causal_lm(student_artifact, dtype=torch.float32)
        model = merge_adapter(base, distill_dir / "adapter")
    elif (distill_dir / "model").is_dir():  # sft/kd train every weight: nothing to merge
        model = load_causal_lm(distill_dir / "model", dtype=torch.float32)
    else:
        raise UserError(f"{distill_dir}: neither adapter/ nor model/ found; is it a distill output?")
    return model, tokenizer


def merged_dtype(student_artifact: str | Path, dtype: str = "auto") -> torch.dtype:
    """The dtype ``eval.merged_dtype`` asks for: ``auto`` = the base student's own."""
    return _saved_dtype(model_location(student_artifact)[0]) if dtype == "auto" else getattr(torch, dtype)


def save_merged(model: torch.nn.Module, tokenizer, out_dir: str | Path, dtype: torch.dtype,
                max_shard_size: str | int = "2GB"):
    """Save ``model`` cast to ``dtype`` (sharded above ``max_shard_size``) with its tokenizer into
    ``out_dir``; returns the model holding exactly the saved values, upcast to fp32 (so what is
    evaluated is what gets registered)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    try:
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    except ValueError as e:  # a malformed size string, e.g. "2 GiB"
        raise UserError(f"eval.max_shard_size: {max_shard_size!r}: {e}") from None
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    return model.float().eval()


def merge(student_artifact: str | Path, distill_dir: str | Path, out_dir: str | Path,
          max_shard_size: str | int = "2GB", dtype: str = "auto"):
    """Base student + adapter → a Hugging Face folder in ``out_dir``; returns (model, tokenizer).

    The merge runs in fp32 (:func:`merge_fp32`); the saved weights are cast to ``dtype`` (``auto`` =
    the student's own) and sharded above ``max_shard_size`` (:func:`save_merged`). No rounding check:
    :func:`run_merge_eval` adds it (:func:`merge_rounding`).
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model, tokenizer = merge_fp32(student_artifact, distill_dir)
    return save_merged(model, tokenizer, out_dir, merged_dtype(student_artifact, dtype), max_shard_size), tokenizer


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def merge_rounding(merged: torch.nn.Module, base: torch.nn.Module | None, teacher: torch.nn.Module, rows: list[dict],
                   pad_id: int, dtype: torch.dtype, cfg: Config) -> dict:
    """How much of the distillation's gain rounding the merged weights to ``dtype`` loses.

    Adapter updates smaller than half a step of ``dtype`` (bf16 keeps 8 significant bits) vanish
    when the merged weights are cast, so a short or low-lr run can lose much of what it learned.
    Measured as KL(teacher‖model) on the val split (:func:`fidelity`, fp32 weights; ``eval.batch_size``,
    ``max_batches``, ``chunk_tokens``) of the base student, the fp32 merge (= the adapter model) and
    the merge rounded to ``dtype``; ``gain_lost`` = (KL_rounded − KL_adapter) / (KL_base − KL_adapter).
    ``base`` is only used (and may be None) when ``dtype`` is not float32.

    Returns the ``merge`` record of eval.json: requested/saved dtype, the three KLs, ``gain_lost``,
    ``max_gain_lost`` (``eval.max_merge_loss``) and ``action``: ``kept`` (within the limit, saved in
    ``dtype``), ``fp32`` (over it, saved in float32), ``fail`` (over it, ``eval.merge_fallback=fail``:
    saved in ``dtype``, the gate fails), ``no_gain`` (the adapter did not lower the KL: nothing to
    lose, saved in ``dtype``), ``exact`` (``dtype`` is float32: nothing is rounded, nothing measured).
    """
    e = cfg.eval
    record = {"requested_dtype": _dtype_name(dtype), "saved_dtype": _dtype_name(dtype), "kl_base": None,
              "kl_adapter": None, "kl_rounded": None, "gain_lost": 0.0, "max_gain_lost": e.max_merge_loss,
              "action": "exact"}
    if dtype == torch.float32:
        return record
    rounded = copy.deepcopy(merged).to(dtype).float()  # what save_merged would hand to the evaluation
    table = fidelity({"base": base, "adapter": merged, "rounded": rounded}, teacher, rows, pad_id,
                     e.batch_size, e.max_batches, e.chunk_tokens)
    del rounded
    kl = {name: table[name]["kl_to_teacher"] for name in ("base", "adapter", "rounded")}
    record.update(kl_base=kl["base"], kl_adapter=kl["adapter"], kl_rounded=kl["rounded"])
    gain = kl["base"] - kl["adapter"]
    if not gain > 0:  # the adapter did not move the model towards the teacher
        record.update(gain_lost=None, action="no_gain")
        return record
    lost = (kl["rounded"] - kl["adapter"]) / gain
    record["gain_lost"] = lost
    if lost <= e.max_merge_loss:  # NaN (a non-finite KL) counts as over the limit
        record["action"] = "kept"
    elif e.merge_fallback == "fp32":
        record.update(saved_dtype="float32", action="fp32")
    else:
        record["action"] = "fail"
    return record


def merge_gate_reason(record: dict) -> str | None:
    """The gate's reason to fail for a merge whose rounding lost too much (``action`` fail), else None."""
    if record.get("action") != "fail":
        return None
    return (f"merge: rounding to {record['requested_dtype']} loses {record['gain_lost']:.1%} of the KL gain "
            f"(KL {record['kl_adapter']:.4g} with the adapter, {record['kl_rounded']:.4g} merged, base "
            f"{record['kl_base']:.4g}) > eval.max_merge_loss {record['max_gain_lost']:g}; set "
            f"eval.merge_fallback=fp32 or eval.merged_dtype=float32")


# --------------------------------------------------------------------------------------------
# Fidelity to the teacher
# --------------------------------------------------------------------------------------------


def _hidden_and_head(model: torch.nn.Module) -> tuple[Callable, Callable]:
    """(final hidden states ``[B, L, H]`` of a batch, hidden ``[N, H]`` → logits ``[N, V]``).

    For a ``*ForCausalLM`` the decoder is ``base_model`` and the head is the output embedding, so
    logits can be made for selected positions only. Other models fall back to full logits (the
    "hidden state" is then the logits and the head the identity).
    """
    decoder, head = getattr(model, "base_model", model), model.get_output_embeddings()
    if decoder is model or head is None:
        return (lambda ids, attn: model(input_ids=ids, attention_mask=attn).logits), (lambda x: x)
    return (lambda ids, attn: decoder(input_ids=ids, attention_mask=attn).last_hidden_state), logits_head(model, head)


@torch.no_grad()
def fidelity(models: dict[str, torch.nn.Module], teacher: torch.nn.Module, rows: list[dict], pad_id: int,
             batch_size: int = 4, max_batches: int = 0, chunk_tokens: int = 256) -> dict[str, dict[str, float]]:
    """KL(teacher‖model), top-1 agreement with the teacher and perplexity, for each model and the teacher.

    Args:
        models: name → causal LM (same tokenizer as the teacher; the teacher's vocabulary may be
            padded wider, extra columns are ignored).
        rows: val rows (``input_ids``, unshifted ``labels`` with -100 outside targets).
        chunk_tokens: positions per fp32 logits chunk: peak extra memory is about
            ``chunk_tokens × V × 4`` bytes per model, whatever the batch and sequence length.
    Returns:
        name → {kl_to_teacher, top1_agreement, perplexity, tokens}; the teacher's own row has
        KL 0 and agreement 1 by definition.
    """
    device = next(teacher.parameters()).device
    runners = {name: _hidden_and_head(m) for name, m in models.items()}
    t_hidden_fn, t_head = _hidden_and_head(teacher)
    checks = {f"model {name!r}": (models[name], *runners[name]) for name in models}
    checks["teacher"] = (teacher, t_hidden_fn, t_head)
    for role, (model, hidden_fn, head) in checks.items():  # the head path gives the model's logits, or refuse
        check_logits_head(model, role, head, lambda ids, fn=hidden_fn: fn(ids, torch.ones_like(ids)))
    sums = {name: {"kl": 0.0, "agree": 0.0, "nll": 0.0} for name in [*models, "teacher"]}
    n_tokens = 0
    for b, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches and b >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], pad_id).items()}
        mask, targets = shift_mask(batch["labels"])
        if not mask.any():
            continue
        ids, attn = batch["input_ids"], batch["attention_mask"]
        t_hidden = t_hidden_fn(ids, attn)[:, :-1][mask]  # [N, H_t]: selected positions only
        s_hidden = {name: fn(ids, attn)[:, :-1][mask] for name, (fn, _) in runners.items()}
        for c in range(0, targets.shape[0], chunk_tokens):
            tgt = targets[c:c + chunk_tokens]
            t_logits = t_head(t_hidden[c:c + chunk_tokens]).float()  # [n, V_t]
            sums["teacher"]["nll"] += float(F.cross_entropy(t_logits, tgt, reduction="sum"))
            sums["teacher"]["agree"] += tgt.numel()
            for name, (_, head) in runners.items():
                s_logits = head(s_hidden[name][c:c + chunk_tokens]).float()  # [n, V]
                vocab = s_logits.shape[-1]
                sums[name]["kl"] += float(divergence(s_logits, t_logits).sum())
                sums[name]["agree"] += float((s_logits.argmax(-1) == t_logits[:, :vocab].argmax(-1)).sum())
                sums[name]["nll"] += float(F.cross_entropy(s_logits, tgt, reduction="sum"))
                del s_logits
            del t_logits
        n_tokens += int(targets.numel())
    if n_tokens == 0:
        raise UserError("val split has no target tokens to evaluate")
    return {name: {"kl_to_teacher": s["kl"] / n_tokens, "top1_agreement": s["agree"] / n_tokens,
                   "perplexity": math.exp(min(50.0, s["nll"] / n_tokens)), "tokens": n_tokens}
            for name, s in sums.items()}


# --------------------------------------------------------------------------------------------
# Sample generations
# --------------------------------------------------------------------------------------------


def sample_prompts(rows: list[dict], n: int) -> list[dict]:
    """The first ``n`` val rows that have a prompt and an answer: the tokens before the first label
    (the prompt, chat template included) and the labelled tokens after it (the reference answer)."""
    prompts = []
    for row in rows:
        labels = row["labels"]
        first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
        if not first:  # no target, or nothing before it to condition on
            continue
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        prompts.append({"prompt_ids": list(row["input_ids"][:first]), "reference_ids": list(labels[first:end])})
        if len(prompts) == n:
            break
    return prompts


@torch.no_grad()
def generate_samples(models: dict[str, tuple], rows: list[dict], n: int, new_tokens: int) -> list[dict]:
    """Greedy continuations of the first ``n`` val prompts by every model, side by side.

    Args:
        models: name → (model, tokenizer); all share the tokenizer (the teacher's vocabulary may be
            wider: it generates with its own).
        rows: tokenized val rows (``input_ids``, ``labels``).
    Returns:
        one dict per prompt: ``prompt`` and ``reference`` (decoded, special tokens dropped) and
        ``outputs`` {name: generated text}.
    """
    if n <= 0 or not models:
        return []
    tokenizer = next(iter(models.values()))[1]
    samples = []
    for p in sample_prompts(rows, n):
        sample = {"prompt": tokenizer.decode(p["prompt_ids"], skip_special_tokens=True).strip(),
                  "reference": tokenizer.decode(p["reference_ids"], skip_special_tokens=True).strip(),
                  "outputs": {}}
        for name, (model, tok) in models.items():
            device = next(model.parameters()).device
            ids = torch.tensor([p["prompt_ids"]], device=device)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            # one prompt at a time: no padding, so every model sees exactly the tokens of training
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            sample["outputs"][name] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        samples.append(sample)
    return samples


# --------------------------------------------------------------------------------------------
# lm-eval
# --------------------------------------------------------------------------------------------


def export_val_text(dataset_dir: str | Path, tokenizer, path: Path) -> Path:
    """The val split's rows decoded back to text, one ``{"text": …}`` per line (llmneo_val_ppl's data)."""
    rows = read_split(dataset_dir, "val")
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": tokenizer.decode(r["input_ids"], skip_special_tokens=False)}) + "\n")
    return path


class _DropExpectedNotices(logging.Filter):
    """lm-eval warns about what llmneo does on purpose (custom datasets for its own tasks, an
    in-memory model instead of a hub id): drop those lines, keep every other warning."""

    EXPECTED = ("Custom kwargs can be passed", "`pretrained` model kwarg is not of type",
                "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


_NOTICE_FILTER = _DropExpectedNotices()


def _quiet_lm_eval() -> None:
    for name in ["lm_eval", *[n for n in logging.root.manager.loggerDict if n.startswith("lm_eval.")]]:
        logging.getLogger(name).addFilter(_NOTICE_FILTER)  # idempotent: one filter object


@contextlib.contextmanager
def _without_env_report():
    """simple_evaluate ends by collecting an environment report (torch's collect_env, which shells out
    to pip: ~2 s per call) and ``git describe`` of the working directory (git prints "fatal: not a
    git repository" into the log outside one); llmneo keeps neither: skip both during the call."""
    import lm_eval.evaluator as evaluator

    stubs = {"add_env_info": lambda results: None, "get_git_commit_hash": lambda: None}
    originals = {name: getattr(evaluator, name) for name in stubs if hasattr(evaluator, name)}
    for name in originals:
        setattr(evaluator, name, stubs[name])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(evaluator, name, original)


def lm_eval_scores(model: torch.nn.Module, tokenizer, tasks: list[str], *, val_jsonl: Path | None = None,
                   limit: int = 0, num_fewshot: int = -1, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on an in-memory model; returns task → {metric: value, metric_stderr: value}.

    The repo's tasks load from ``llmneo/tasks`` only (``include_defaults=False``: fast, offline);
    any other name switches on lm-eval's own task catalogue (those datasets come from the hub).
    """
    if not tasks:
        return {}
    local = local_task_names()
    typos = [t for t in tasks if t.startswith("llmneo_") and t not in local]  # caught before indexing lm-eval's catalogue
    if typos:
        raise UserError(f"eval.lm_eval_tasks: unknown task(s) {', '.join(typos)}; repo tasks: {', '.join(sorted(local))}")
    if VAL_PPL_TASK in tasks and val_jsonl is None:
        raise UserError(f"eval.lm_eval_tasks: {VAL_PPL_TASK} needs the dataset's val split")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=not set(tasks) <= local,
                          metadata={"llmneo_val_jsonl": str(val_jsonl) if val_jsonl else ""})
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise UserError(f"eval.lm_eval_tasks: unknown task(s) {', '.join(unknown)}; repo tasks: "
                        f"{', '.join(sorted(local))}, or any lm-eval 0.4 task name")
    _quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with _without_env_report():
            out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit or None,
                                  num_fewshot=None if num_fewshot < 0 else num_fewshot, log_samples=False,
                                  bootstrap_iters=1000, verbosity="WARNING")
    except (ConnectionError, FileNotFoundError) as e:  # a standard task whose dataset is not reachable
        raise UserError(f"eval.lm_eval_tasks {','.join(tasks)}: cannot load a task's dataset ({str(e).splitlines()[0]}); "
                        f"standard tasks need the hub (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE unset) or a "
                        f"pre-filled HF datasets cache; offline runs use {', '.join(sorted(local))}") from None
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if _filter and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[metric] = float(value)
        if row:
            scores[task] = row
    return scores


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------

ModelSpec = str | Path | tuple  # an artifact folder, or an already-loaded (model, tokenizer)


def _load(spec: ModelSpec, device: torch.device):
    if isinstance(spec, tuple):
        model, tokenizer = spec
    else:
        model = load_causal_lm(spec, dtype=eval_dtype(device))
        tokenizer = load_tokenizer(model_location(spec)[0])
    return model.to(device).eval(), tokenizer


def summary(fidelity_row: dict, lm_eval_row: dict) -> dict[str, float]:
    """One flat metrics dict per model: fidelity keys plus ``task/metric`` lm-eval scores."""
    flat = {k: fidelity_row[k] for k in FIDELITY_KEYS if k in fidelity_row}
    for task, metrics in sorted(lm_eval_row.items()):
        flat.update({f"{task}/{m}": v for m, v in metrics.items() if not m.endswith("_stderr")})
    return flat


def evaluate_models(models: dict[str, ModelSpec], teacher: ModelSpec, dataset_dir: str | Path, cfg: Config,
                    lm_eval_on: list[str] | None = None) -> dict:
    """Evaluate models against a teacher on a prepared dataset: fidelity (val split) + lm-eval tasks.

    Args:
        models: name → model artifact folder (weights, or a card that references them) or a loaded
            ``(model, tokenizer)``. All models are held in memory together with the teacher.
        teacher: the same for the teacher (its tokenizer must be the students').
        dataset_dir: a prepared dataset (``val.parquet``); the val split drives fidelity and
            ``llmneo_val_ppl``.
        cfg: ``cfg.eval`` gives batch sizes, chunking, the lm-eval tasks and limits.
        lm_eval_on: names (from ``models`` or ``"teacher"``) to run lm-eval on; default all.
    Returns:
        {"fidelity": name → metrics (teacher included), "lm_eval": name → task → metrics,
         "summary": name → flat metrics (see :func:`summary`), "samples": greedy generations of
         every model on the first ``cfg.eval.samples`` val prompts (:func:`generate_samples`), "seconds": …}
    """
    t0 = time.time()
    device = eval_device()
    loaded = {name: _load(spec, device) for name, spec in models.items()}
    teacher_model, teacher_tok = _load(teacher, device)
    rows = read_split(dataset_dir, "val")
    pad_id = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    e = cfg.eval
    table = fidelity({n: m for n, (m, _) in loaded.items()}, teacher_model, rows, pad_id, e.batch_size,
                     e.max_batches, e.chunk_tokens)
    everything = {**loaded, "teacher": (teacher_model, teacher_tok)}
    samples = generate_samples({"teacher": everything["teacher"], **loaded}, rows, e.samples, e.sample_new_tokens)
    lm_eval_on = list(everything) if lm_eval_on is None else [n for n in lm_eval_on if n in everything]
    scores: dict[str, dict] = {}
    if e.lm_eval_tasks:
        with tempfile.TemporaryDirectory(prefix="llmneo-eval-") as tmp:
            val_jsonl = export_val_text(dataset_dir, teacher_tok, Path(tmp) / "val.jsonl")
            for name in lm_eval_on:
                model, tokenizer = everything[name]
                print(f"lm-eval: {name} on {', '.join(e.lm_eval_tasks)}", flush=True)
                scores[name] = lm_eval_scores(model, tokenizer, e.lm_eval_tasks, val_jsonl=val_jsonl,
                                              limit=e.lm_eval_limit, num_fewshot=e.lm_eval_num_fewshot,
                                              batch_size=e.lm_eval_batch_size)
    return {"fidelity": table, "lm_eval": scores,
            "summary": {name: summary(table[name], scores.get(name, {})) for name in table},
            "samples": samples, "seconds": round(time.time() - t0, 2)}


# --------------------------------------------------------------------------------------------
# Gate
# --------------------------------------------------------------------------------------------

def thresholds(cfg: Config) -> list[tuple[str, str, float, str]]:
    """Every active gate rule as (metric, op, value, config key)."""
    e = cfg.eval
    rules = [("kl_to_teacher", "<=", e.max_kl_to_teacher, "eval.max_kl_to_teacher"),
             ("perplexity", "<=", e.max_perplexity, "eval.max_perplexity")]
    if e.min_top1_agreement > 0:
        rules.append(("top1_agreement", ">=", e.min_top1_agreement, "eval.min_top1_agreement"))
    if e.min_mc_accuracy > 0:
        rules.append((f"{MC_TASK}/acc", ">=", e.min_mc_accuracy, "eval.min_mc_accuracy"))
    for i, rule in enumerate(e.thresholds):  # syntax already checked when the configuration loaded
        key = f"eval.thresholds[{i}]"
        rules.append((*parse_threshold(rule, key), key))
    return rules


# lm-eval metrics that are task scores (higher is better); perplexities and stderr are not
TASK_SCORES = ("acc", "acc_norm", "exact_match", "f1", "mc1", "mc2")


def _base_rules(cfg: Config, metrics: dict[str, float], base: dict[str, float]):
    """The relative gate's rules: (metric, value, limit, op, how the limit came from the base or None)."""
    e = cfg.eval
    if not e.gate_vs_base:
        return []
    b = base.get("kl_to_teacher")
    rules = [("kl_to_teacher", metrics.get("kl_to_teacher"), "<=",
              None if b is None else (b * (1 - e.min_kl_reduction),
                                      f"base {b:.4g} × (1 - eval.min_kl_reduction {e.min_kl_reduction:g})"))]
    for metric in sorted(metrics):
        task, _, score = metric.rpartition("/")
        if task and score in TASK_SCORES and metric in base:
            rules.append((metric, metrics[metric], ">=",
                          (base[metric] - e.max_task_drop,
                           f"base {base[metric]:.4g} - eval.max_task_drop {e.max_task_drop:g}")))
    return rules


def compare_to_base(cfg: Config, metrics: dict[str, float], base: dict[str, float]) -> list[str]:
    """Each comparison of the relative gate with its numbers, e.g. ``kl_to_teacher 1.059 <= 2.815 (base
    3.128 × (1 - eval.min_kl_reduction 0.1)): pass`` — what the report shows."""
    out = []
    for metric, value, op, limit in _base_rules(cfg, metrics, base):
        if limit is None or value is None:
            continue
        ok = value <= limit[0] if op == "<=" else value >= limit[0]
        out.append(f"{metric} {value:.4g} {op} {limit[0]:.4g} ({limit[1]}): {'pass' if ok else 'fail'}")
    return out


def gate(cfg: Config, metrics: dict[str, float], base: dict[str, float] | None = None) -> tuple[bool, list[str]]:
    """Apply every threshold to the distilled model's flat metrics and, given the base student's
    (``base``), the relative gate (``eval.gate_vs_base``); returns (passed, reasons for failing)."""
    reasons = []
    for metric, op, limit, key in thresholds(cfg):
        value = metrics.get(metric)
        if value is None:
            reasons.append(f"{metric} not evaluated ({key} needs it; check eval.lm_eval_tasks)")
        elif not (value <= limit if op == "<=" else value >= limit):  # NaN fails too
            reasons.append(f"{metric} {value:.4g} {'>' if op == '<=' else '<'} {key} {limit:g}")
    for metric, value, op, limit in _base_rules(cfg, metrics, base) if base is not None else []:
        if limit is None:
            reasons.append(f"{metric}: the base student's was not evaluated (eval.gate_vs_base needs it)")
        elif value is None:
            reasons.append(f"{metric} not evaluated (eval.gate_vs_base needs it)")
        elif not (value <= limit[0] if op == "<=" else value >= limit[0]):  # NaN fails too
            reasons.append(f"{metric} {value:.4g} {'>' if op == '<=' else '<'} {limit[0]:.4g} ({limit[1]})")
    return not reasons, reasons


# --------------------------------------------------------------------------------------------
# Step 4
# --------------------------------------------------------------------------------------------


MODEL_FACTS = ("source", "ref", "revision", "architecture", "parameters", "layers", "hidden_size", "vocab_size",
               "dtype", "pruned_from", "kept_layers")
DISTILL_FACTS = ("method", "steps", "world_size", "strategy", "global_batch_size", "micro_batch_size",
                 "trainable_parameters",
                 "tokens_per_s", "peak_mem_mb", "seconds", "wall_seconds", "final")


def model_facts(card: ModelCard) -> dict:
    """What a model is (source, architecture, size, how it was pruned), for the report."""
    return {k: getattr(card, k) for k in MODEL_FACTS if getattr(card, k) is not None}


def distill_facts(card: DistillCard) -> dict:
    """How the training ran (steps, time, throughput, peak memory), for the report."""
    return {k: getattr(card, k) for k in DISTILL_FACTS if getattr(card, k) is not None}


def run_merge_eval(cfg: Config, dataset_dir: str | Path, teacher_artifact: str | Path,
                   student_artifact: str | Path, distill_dir: str | Path, model_out: str | Path) -> dict:
    """Merge, evaluate base student / distilled / teacher, gate; write eval.json, reports and the
    model card into ``model_out`` (the merged model folder), then, last, its :class:`EvalCard`.
    Returns the eval dict (the content of eval.json)."""
    from llmneo.registry import git_commit
    from llmneo.report import merge_line, write_model_card, write_report

    t0 = time.time()
    model_out, distill_dir = Path(model_out), Path(distill_dir)
    # the inputs' cards first: an incomplete upstream step fails before the merge
    distill_card, dataset_card = DistillCard.read(distill_dir), DatasetCard.read(dataset_dir)
    teacher_card, student_card = ModelCard.read(teacher_artifact), ModelCard.read(student_artifact)
    model_out.mkdir(parents=True, exist_ok=True)
    cards.remove(model_out)  # a failed re-run must not leave the previous card (= "complete") behind
    (model_out / "eval.json").unlink(missing_ok=True)
    device = eval_device()
    merged, tokenizer = merge_fp32(student_artifact, distill_dir)
    dtype = merged_dtype(student_artifact, cfg.eval.merged_dtype)
    teacher = _load(teacher_artifact, device)  # loaded once: the rounding check and the evaluation
    # the cast may round the adapter's updates away: measure that first (needs the fp32 base student)
    base = load_causal_lm(student_artifact, dtype=torch.float32).to(device).eval() if dtype != torch.float32 else None
    pad_id = teacher[1].pad_token_id if teacher[1].pad_token_id is not None else 0
    merged = merged.to(device).eval()
    merge_record = merge_rounding(merged, base, teacher[0], read_split(dataset_dir, "val"), pad_id, dtype, cfg)
    print(f"merge: saved as {merge_record['saved_dtype']}; {merge_line(merge_record)}", flush=True)
    merged = save_merged(merged, tokenizer, model_out, getattr(torch, merge_record["saved_dtype"]),
                         cfg.eval.max_shard_size)
    weights = weight_digests(model_out)  # what is evaluated below: register checks the files still match
    # evaluate the saved values: bf16 on GPU as usual, but a float32 save stays float32
    merged = merged.to(eval_dtype(device) if merge_record["saved_dtype"] != "float32" else torch.float32)
    # the fp32 base student doubles as the evaluation's when that runs in fp32 (CPU)
    base_spec = (base, tokenizer) if base is not None and eval_dtype(device) == torch.float32 else student_artifact
    del base
    lm_eval_on = [n for n in cfg.eval.lm_eval_models if n != "distilled"] + ["distilled"]
    evaluation = evaluate_models({"base_student": base_spec, "distilled": (merged, tokenizer)},
                                 teacher, dataset_dir, cfg, lm_eval_on=lm_eval_on)
    metrics = evaluation["summary"]["distilled"]
    base_metrics = evaluation["summary"].get("base_student") or {}
    passed, reasons = gate(cfg, metrics, base_metrics)
    merge_reason = merge_gate_reason(merge_record)
    if merge_reason:
        passed, reasons = False, [*reasons, merge_reason]
    result = {
        "kind": "eval",
        "fidelity": evaluation["fidelity"],
        "lm_eval": evaluation["lm_eval"],
        "summary": evaluation["summary"],
        "metrics": metrics,
        "gate": {"passed": passed, "reasons": reasons,
                 "thresholds": [f"{m}{op}{v:g}" for m, op, v, _ in thresholds(cfg)],
                 "compared": compare_to_base(cfg, metrics, base_metrics)},
        "merge": merge_record,
        "method": distill_card.method,
        "teacher": teacher_card.source,
        "student": student_card.source,
        "dataset": {"source": dataset_card.source, "counts": dataset_card.counts,
                    **({"generated": dataset_card.source_info["generated"]}
                       if dataset_card.source_info.get("generated") else {})},
        "samples": evaluation["samples"],
        "models": {"teacher": model_facts(teacher_card), "base_student": model_facts(student_card)},
        "distill": distill_facts(distill_card),
        "dataset_hash": dataset_card.dataset_hash,
        "config_hash": cfg.hash(),
        "git_commit": git_commit(),
        "seconds": round(time.time() - t0, 2),
    }
    (model_out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    log = distill_dir / "train_log.jsonl"
    if log.is_file():
        shutil.copy(log, model_out / "train_log.jsonl")
    write_report(model_out, result, log if log.is_file() else None, cfg)
    write_model_card(model_out, result, cfg)
    EvalCard(method=result["method"], teacher=result["teacher"], student=result["student"],
             dataset_hash=result["dataset_hash"], config_hash=result["config_hash"], metrics=metrics,
             gate=result["gate"], summary=result["summary"], merge=merge_record,
             seconds=result["seconds"], weights=weights).write(model_out)
    return result
