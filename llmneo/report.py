"""Human-facing outputs: terminal/Markdown/HTML tables, the evaluation report (report.md and a
self-contained report.html), the loss-curve plot and the model card (README.md of the merged model)."""

from __future__ import annotations

import base64
import html
import json
import re
import textwrap
from pathlib import Path

from tabulate import tabulate

from llmneo.config import Config

FIDELITY_COLUMNS = ("kl_to_teacher", "top1_agreement", "perplexity")
MODEL_ORDER = ("base_student", "distilled", "teacher")
# the one number per lm-eval task shown in the comparison table (first one the task reports)
HEADLINE_METRICS = ("acc", "acc_norm", "exact_match", "bits_per_byte", "word_perplexity", "perplexity")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list], align_right: bool = True, max_width: int | None = None) -> str:
    """A plain-text table for terminals (monospace): numbers right-aligned unless ``align_right`` is
    off; with ``max_width`` the last column wraps so that every line fits in that many characters."""
    cells = [[_fmt(c) for c in r] for r in rows]
    align = ["left"] + ["right" if align_right else "left"] * (len(headers) - 1)
    widths = None
    if max_width and cells:
        # the first column at its natural width, the middle ones share what the last one (at least
        # 20 characters) leaves, at most 24 each; wrapped cells continue on the next lines
        natural = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        middle = len(headers) - 2
        share = (max_width - natural[0] - 2 * (len(headers) - 1) - 20) // middle if middle > 0 else 0
        fixed = [natural[0]] + [min(w, 24, max(8, share)) for w in natural[1:-1]]
        last = max(20, max_width - sum(fixed) - 2 * len(fixed))
        widths = [None, *fixed[1:], last]
    return tabulate(cells, [str(h) for h in headers], tablefmt="simple", disable_numparse=True,
                    colalign=align if cells else None, maxcolwidths=widths)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in a cell escaped, newlines folded)."""
    def cell(value) -> str:
        # _ and * would start emphasis (kl_to_teacher → "kltoteacher" in the KFP UI's viewer)
        text = _fmt(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
        return text.replace("_", "\\_").replace("*", "\\*")

    return tabulate([[cell(c) for c in r] for r in rows], [cell(h) for h in headers], tablefmt="github",
                    disable_numparse=True)


def html_table(headers: list[str], rows: list[list]) -> str:
    """An HTML table, every cell escaped (unpadded: tabulate's html pads cells to a common width)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _ordered(names) -> list[str]:
    return [n for n in MODEL_ORDER if n in names] + [n for n in names if n not in MODEL_ORDER]



def headline(task_metrics: dict[str, float]) -> str | None:
    return next((m for m in HEADLINE_METRICS if m in task_metrics), None)


def comparison(result: dict) -> tuple[list[str], list[list]]:
    """Models side by side: fidelity to the teacher plus one headline number per lm-eval task.

    ``result`` is an :func:`llmneo.evaluate.evaluate_models` result (or eval.json).
    """
    fidelity, scores = result["fidelity"], result.get("lm_eval", {})
    tasks: dict[str, str] = {}
    for name in _ordered(scores):
        for task, metrics in sorted(scores[name].items()):
            if task not in tasks and headline(metrics):
                tasks[task] = headline(metrics)
    headers = ["model", *FIDELITY_COLUMNS, *[f"{t}/{m}" for t, m in tasks.items()]]
    rows = [[name, *[fidelity[name][c] for c in FIDELITY_COLUMNS],
             *[scores.get(name, {}).get(t, {}).get(m) for t, m in tasks.items()]]
            for name in _ordered(fidelity)]
    return headers, rows


def lm_eval_rows(scores: dict[str, dict]) -> tuple[list[str], list[list]]:
    """Every lm-eval metric of every model: (model, task, metric, value, stderr)."""
    rows = []
    for name in _ordered(scores):
        for task, metrics in sorted(scores[name].items()):
            for metric, value in metrics.items():
                if not metric.endswith("_stderr"):
                    rows.append([name, task, metric, value, metrics.get(f"{metric}_stderr")])
    return ["model", "task", "metric", "value", "stderr"], rows


def gate_line(gate: dict) -> str:
    return "PASS" if gate["passed"] else "FAIL — " + "; ".join(gate["reasons"])


# --------------------------------------------------------------------------------------------
# Loss curve
# --------------------------------------------------------------------------------------------


def read_log(log_path: Path | None) -> list[dict]:
    if not log_path or not Path(log_path).is_file():
        return []
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


def _series(log: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in log if r.get(key) is not None and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def validation_pair(log: list[dict]) -> tuple[str, str]:
    """(validation key, training key) that measure the same thing: the weighted loss on both sides
    when validation has the KD term (online teacher) or training has none (sft, lora, alpha 0); else
    (``teacher.mode=offline``: the top-k cache covers the train split only, validation is CE alone)
    the CE on both sides, not raw validation CE beside the weighted training loss."""
    val_has_kd = any("val_kd" in r for r in log)
    train_has_kd = any((r.get("kd") or 0) > 0 for r in log)
    if val_has_kd or not train_has_kd:
        return "val_loss", "loss"
    return ("val_ce" if any("val_ce" in r for r in log) else "val_loss"), "ce"


def plot_loss(log: list[dict], out_png: Path) -> Path | None:
    """The training curves as one PNG (matplotlib, headless), one panel per quantity so that none is
    flattened by another's scale: loss and CE; KD (log scale); learning rate; validation loss (when
    the log has ``val_loss``; else tokens/s)."""
    steps, _ = _series(log, "loss")
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marker = "o" if len(steps) < 30 else None
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.5), dpi=90)
    (ax_loss, ax_kd), (ax_lr, ax_val) = axes

    for key in ("loss", "ce"):
        ax_loss.plot(*_series(log, key), label=key, marker=marker)
    ax_loss.set_title("training loss and CE (labels)")
    ax_loss.legend()

    kd_steps, kd = _series(log, "kd")
    if kd and max(kd) > 0:
        ax_kd.plot(kd_steps, kd, color="tab:green", marker=marker)
        if min(kd) > 0:
            ax_kd.set_yscale("log")
    else:  # sft / lora: the loss has no KD term, a line at 0 would only mislead
        ax_kd.text(0.5, 0.5, "no KD term in this method's loss", ha="center", va="center",
                   transform=ax_kd.transAxes, color="grey")
    ax_kd.set_title("KD: divergence to the teacher")

    ax_lr.plot(*_series(log, "lr"), color="tab:purple", marker=marker)
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    val_steps, val = _series(log, "val_loss")
    if val:
        val_key, train_key = validation_pair(log)
        name = "loss" if train_key == "loss" else "CE"
        ax_val.plot(*_series(log, val_key), color="tab:red", marker="o", label=f"val {name}")
        ax_val.plot(*_series(log, train_key), color="tab:blue", alpha=0.4, label=f"train {name}")
        ax_val.legend()
        ax_val.set_title("validation loss (val split)")
    else:
        ax_val.plot(*_series(log, "tokens_per_s"), color="tab:orange", marker=marker)
        ax_val.set_title("throughput (tokens/s)")
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


TRAIN_COLUMNS = ("step", "loss", "ce", "kd", "val_loss", "lr", "tokens_per_s")
KD_METHODS = ("kd", "neo")
# the KFP UI's Markdown viewer renders at most 400,000 characters (MarkdownViewer.tsx) and lets
# data:image URLs through its sanitizer (markdown-to-jsx): the curves are embedded below this size
MD_IMAGE_BUDGET = 250_000


def _train_columns(log: list[dict], method: str | None) -> list[str]:
    """The columns that exist: no KD for sft/lora, no val_loss unless it was logged."""
    return [c for c in TRAIN_COLUMNS if any(r.get(c) is not None for r in log)
            and not (c == "kd" and method not in KD_METHODS)]


def _train_rows(log: list[dict], columns: list[str], last: int = 10) -> list[list]:
    rows = [r for r in log if r.get("loss") is not None or r.get("val_loss") is not None]
    return [[r.get(c) for c in columns] for r in rows[-last:]]


# --------------------------------------------------------------------------------------------
# What the models are, how the training ran
# --------------------------------------------------------------------------------------------

KNOWN_SOURCES = {"smollm2": "SmolLM2-135M-Instruct (packaged GGUF, bf16)",
                 "tiny": "tiny random-init Llama (seeded)"}


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 6] → "0-2, 5-6"."""
    out, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n != start else str(n))
            start = None
    return ", ".join(out)


def model_name(facts: dict, teacher: dict | None = None) -> str:
    """A readable name for a model from its card facts: the hub id, the packaged model, a pruned copy."""
    source = str(facts.get("source") or "?")
    if source.startswith("hf:"):
        name = source[3:].split("@")[0]
        revision = facts.get("revision")
        return f"{name} @ {revision[:10]}" if revision else name
    if facts.get("kept_layers") is not None and teacher:
        kept = facts["kept_layers"]
        return (f"{model_name(teacher)}, pruned to {len(kept)} of {teacher.get('layers', '?')} layers "
                f"({_layer_ranges(kept)})")
    return KNOWN_SOURCES.get(source, source)


def models_rows(result: dict) -> tuple[list[str], list[list]]:
    """Teacher and base student: name, architecture, parameters, layers, dtype."""
    models = result.get("models") or {}
    teacher = models.get("teacher")
    rows = []
    for role, label in (("teacher", "teacher"), ("base_student", "student (base)")):
        facts = models.get(role)
        if facts:
            params = facts.get("parameters")
            rows.append([label, model_name(facts, teacher), facts.get("architecture"),
                         f"{params / 1e6:.1f}M" if params else None, facts.get("layers"), facts.get("dtype")])
    return ["role", "model", "architecture", "parameters", "layers", "dtype"], rows


def _mb(value) -> str | None:
    return None if value is None else (f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB")


def distill_rows(result: dict) -> list[list]:
    """The distillation's cost: steps, wall time, training time, throughput, peak memory."""
    d = result.get("distill") or {}
    if not d:
        return []
    final = d.get("final") or {}
    rows = [["method", d.get("method")], ["optimizer steps", d.get("steps")],
            ["processes", f"{d.get('world_size', 1)} ({d.get('strategy') or '-'})"],
            ["global batch (sequences)", d.get("global_batch_size")],
            ["micro-batch (sequences per process)", d.get("micro_batch_size")],
            ["trainable parameters", f"{d['trainable_parameters'] / 1e6:.2f}M" if d.get("trainable_parameters") else None],
            ["wall time of the step", f"{d['wall_seconds']:.1f} s" if d.get("wall_seconds") is not None else None],
            ["training time", f"{d['seconds']:.1f} s" if d.get("seconds") is not None else None],
            ["throughput", f"{d['tokens_per_s']:.0f} tokens/s" if d.get("tokens_per_s") else None],
            ["peak memory (per process)", _mb(d.get("peak_mem_mb"))],
            ["final loss / CE / KD", " / ".join(f"{final[k]:.4f}" for k in ("loss", "ce", "kd") if k in final) or None]]
    return [r for r in rows if r[1] is not None]


def _fence(text: str, width: int = 100) -> list[str]:
    """A fenced code block whose fence cannot be closed by the text inside; long lines wrapped (a
    code block does not wrap in the KFP UI's Markdown viewer)."""
    fence = "```"
    while fence in text:
        fence += "`"
    lines = [piece for line in (text or "(nothing)").splitlines()
             for piece in (textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=False) or [""])]
    return [fence, *lines, fence]


def _md_text(text: str) -> str:
    """Running text for Markdown: characters that would start emphasis or a link are escaped."""
    return re.sub(r"([\\_*\[\]<>`])", r"\\\1", text)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def merge_line(record: dict) -> str:
    """One line on the merge's precision (eval.json ``merge``, :func:`llmneo.evaluate.merge_rounding`)."""
    action = record.get("action")
    if action == "exact":
        return "saved in float32: no rounding"
    if action == "no_gain":
        return (f"the adapter did not lower KL to the teacher ({record['kl_base']:.4g} → {record['kl_adapter']:.4g}); "
                f"saved in {record['saved_dtype']}")
    verdict = {"kept": "within", "fp32": "over", "fail": "over"}.get(action, "?")
    outcome = {"kept": f"kept {record['requested_dtype']}", "fp32": "saved in float32 instead",
               "fail": "gate fails (eval.merge_fallback=fail)"}.get(action, "")
    return (f"KL to teacher {record['kl_base']:.4g} (base) → {record['kl_adapter']:.4g} with the adapter, "
            f"{record['kl_rounded']:.4g} merged in {record['requested_dtype']}: {record['gain_lost']:.2%} of the "
            f"gain lost, {verdict} eval.max_merge_loss {record['max_gain_lost']:.2%}; {outcome}")


def write_report(out_dir: Path, result: dict, log_path: Path | None, cfg: Config) -> tuple[Path, Path]:
    """report.md and report.html (curves embedded, so each is one self-contained file) in ``out_dir``."""
    out_dir = Path(out_dir)
    log = read_log(log_path)
    png = plot_loss(log, out_dir / "loss_curve.png")
    image = base64.b64encode(png.read_bytes()).decode() if png else ""
    headers, rows = comparison(result)
    lm_headers, lm_rows = lm_eval_rows(result.get("lm_eval", {}))
    model_headers, model_rows = models_rows(result)
    cost = distill_rows(result)
    train_columns = _train_columns(log, result.get("method"))
    samples = result.get("samples") or []
    gate = result["gate"]
    thresholds_text = ", ".join(gate.get("thresholds", [])) or "none"
    title = f"llmneo evaluation — {cfg.name}"
    models = result.get("models") or {}
    teacher_name = model_name(models["teacher"]) if models.get("teacher") else result.get("teacher")
    student_name = (model_name(models["base_student"], models.get("teacher")) if models.get("base_student")
                    else result.get("student"))
    intro = (f"Method {result.get('method')}: the student ({student_name}) learns from the teacher "
             f"({teacher_name}) on {(result.get('dataset') or {}).get('source') or 'the dataset'}. "
             f"Dataset hash {result.get('dataset_hash')}, config hash {result.get('config_hash')}.")
    fidelity_note = ("Fidelity columns are measured on the val split against the teacher "
                     "(KL(teacher‖model) per token, top-1 agreement, perplexity on the labels); task columns "
                     "come from lm-eval; - = not evaluated (see {}).")
    sample_note = (f"Greedy decoding, at most {cfg.eval.sample_new_tokens} new tokens, on the first "
                   f"{len(samples)} prompts of the val split (held out from training).")
    names = _ordered(samples[0]["outputs"]) if samples else []

    md = [f"# {title}", "", _md_text(intro), ""]
    if model_rows:
        md += ["## Models", "", markdown_table(model_headers, model_rows), ""]
    md += ["## Base student, distilled student and teacher", "", fidelity_note.format("`eval.lm_eval_models`"), "",
           markdown_table(headers, rows), "",
           f"**Gate: {_md_text(gate_line(gate))}** (thresholds: `{thresholds_text}`)", ""]
    if gate.get("compared"):
        md += [_md_text("Compared with the base student: " + "; ".join(gate["compared"])), ""]
    if samples:
        md += ["## Sample generations", "", sample_note, ""]
        for i, sample in enumerate(samples, 1):
            md += [f"### Prompt {i}", "", *_fence(sample["prompt"]), ""]
            for name in names:
                md += [f"**{name}**", "", *_fence(sample["outputs"][name]), ""]
            md += ["*reference answer*", "", *_fence(sample["reference"]), ""]
    generated = (result.get("dataset") or {}).get("generated")
    if generated:
        md += ["## Teacher-written answers", "", _md_text(generated_line(generated)), ""]
        for sample in generated.get("samples") or []:
            md += [f"Source row {sample['row']}:", "",
                   *_fence("\n".join(f"[{m['role']}] {m['content']}" for m in sample["messages"])), ""]
    if cost:
        md += ["## Distillation run", "", markdown_table(["what", "value"], cost), ""]
    if result.get("merge"):
        md += [f"Merge: {_md_text(merge_line(result['merge']))}.", ""]
    if lm_rows:
        md += ["## lm-eval, every metric", "", markdown_table(lm_headers, lm_rows), ""]
    if log:
        md += ["## Training (last steps)", "", markdown_table(train_columns, _train_rows(log, train_columns)), ""]
    if image and len(image) <= MD_IMAGE_BUDGET:
        md += ["## Training curves", "", f"![training curves](data:image/png;base64,{image})", ""]
    elif image:
        md += ["## Training curves", "", "In report.html and loss_curve.png next to this file.", ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    badge = "pass" if gate["passed"] else "fail"
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    if model_rows:
        body += ["<h2>Models</h2>", html_table(model_headers, model_rows)]
    body += ["<h2>Base student, distilled student and teacher</h2>",
             f"<p>{html.escape(fidelity_note.format('eval.lm_eval_models'))}</p>",
             html_table(headers, rows),
             f'<p class="gate {badge}">Gate: {html.escape(gate_line(gate))}</p>',
             f"<p>thresholds: {html.escape(thresholds_text)}</p>"]
    if gate.get("compared"):
        body.append(f"<p>{html.escape('Compared with the base student: ' + '; '.join(gate['compared']))}</p>")
    if result.get("merge"):
        body.append(f'<p class="merge">Merge: {html.escape(merge_line(result["merge"]))}.</p>')
    if samples:
        head = "".join(f"<th>{html.escape(n)}</th>" for n in [*names, "reference answer"])
        trs = "".join(
            f'<tr><td colspan="{len(names) + 1}" class="prompt"><pre>{html.escape(s["prompt"])}</pre></td></tr>'
            "<tr>" + "".join(f"<td><pre>{html.escape(s['outputs'][n])}</pre></td>" for n in names)
            + f'<td class="ref"><pre>{html.escape(s["reference"])}</pre></td></tr>' for s in samples)
        body += ["<h2>Sample generations</h2>", f"<p>{html.escape(sample_note)}</p>",
                 f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>']
    if generated:
        body += ["<h2>Teacher-written answers</h2>", f"<p>{html.escape(generated_line(generated))}</p>"]
        body += [f"<p>Source row {s['row']}:</p><pre>"
                 + html.escape("\n".join(f"[{m['role']}] {m['content']}" for m in s["messages"])) + "</pre>"
                 for s in generated.get("samples") or []]
    if cost:
        body += ["<h2>Distillation run</h2>", html_table(["what", "value"], cost)]
    if image:
        body.append(f'<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{image}">')
    if lm_rows:
        body += ["<h2>lm-eval, every metric</h2>", html_table(lm_headers, lm_rows)]
    if log:
        body += ["<h2>Training (last steps)</h2>", html_table(train_columns, _train_rows(log, train_columns))]
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
             "td:first-child,th{text-align:left}.gate{font-weight:bold;padding:.4em}.pass{background:#dfd}"
             ".fail{background:#fdd}table.samples{table-layout:fixed;width:100%}"
             "table.samples td{text-align:left;vertical-align:top;overflow-wrap:anywhere}"
             "table.samples pre{white-space:pre-wrap;margin:0;font-size:.85em}td.prompt{background:#f4f4f8}"
             "td.ref{color:#555}img{max-width:100%}")
    html_path = out_dir / "report.html"
    html_path.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                         f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return md_path, html_path


def generated_line(generated: dict) -> str:
    """The generate step in one sentence: who answered, how, and what was kept."""
    g, c = generated.get("generation") or {}, generated.get("counts") or {}
    how = ("greedy" if not g.get("temperature") else
           f"sampled at temperature {g['temperature']}, top-p {g.get('top_p')}, seed {g.get('seed')}")
    rejected = ", ".join(f"{k} {v}" for k, v in (generated.get("rejected_by_kind") or {}).items()) or "none"
    return (f"The training answers were written by the teacher ({(generated.get('teacher') or {}).get('source')}, "
            f"fingerprint {(generated.get('teacher') or {}).get('fingerprint')}; data.answers="
            f"{generated.get('answers')}): {how}, at most {g.get('max_new_tokens')} new tokens; "
            f"{c.get('answered', 0)} records answered, {c.get('kept', 0)} kept; rejected: {rejected}.")


def write_model_card(out_dir: Path, result: dict, cfg: Config) -> Path:
    """README.md of the merged model: method, teacher, student, data, hyper-parameters, evaluation, lineage."""
    d = cfg.distill
    headers, rows = comparison(result)
    hyper = [["method", d.method], ["alpha (KD weight)", d.alpha], ["temperature", d.temperature],
             ["divergence", d.divergence], ["LoRA rank / alpha / dropout", f"{d.lora_rank} / {d.lora_alpha} / {d.lora_dropout}"],
             ["LoRA targets", d.lora_targets], ["optimizer steps", d.max_steps or f"{d.epochs:g} epochs"],
             ["global batch (sequences)", d.global_batch_size], ["learning rate", d.lr],
             ["warmup ratio", d.warmup_ratio], ["max length", cfg.data.max_length],
             ["processes × nodes", f"{d.nproc_per_node} × {d.nnodes}"], ["seed", d.seed]]
    dataset = result.get("dataset") or {}
    lineage = [["teacher", result.get("teacher")], ["student (base)", result.get("student")],
               ["data source", dataset.get("source", cfg.data.source)],
               ["data rows (train / val)", f"{(dataset.get('counts') or {}).get('train', '?')} / "
                                           f"{(dataset.get('counts') or {}).get('val', '?')}"],
               ["dataset hash", result.get("dataset_hash")], ["config hash", result.get("config_hash")],
               ["preset", cfg.name], ["git commit", result.get("git_commit")]]
    student = str(result.get("student") or "")
    base_model = f"base_model: {student[3:].split('@')[0]}\n" if student.startswith("hf:") else ""
    text = f"""---
library_name: transformers
pipeline_tag: text-generation
{base_model}tags: [llmneo, distillation, lora, llm-neo]
---
# {cfg.registry.name}

Distilled with llmneo's LLM-NEO recipe ([arXiv 2411.06839](https://arxiv.org/abs/2411.06839)): only a
LoRA branch of the student was trained, on (1-α)·CE(labels) + α·T²·{d.divergence}(teacher‖student)
with the base frozen, then merged into the weights of this folder.

## Hyper-parameters

{markdown_table(["setting", "value"], hyper)}

## Evaluation

Fidelity to the teacher on the held-out val split, and lm-eval tasks; base student, this model
(distilled) and the teacher side by side.

{markdown_table(headers, rows)}

Registration gate: {gate_line(result["gate"])}.

## Lineage

{markdown_table(["what", "value"], lineage)}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```
"""
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path
