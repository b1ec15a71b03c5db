"""Human-facing outputs: terminal/Markdown/HTML tables, the evaluation report (report.md and a
self-contained report.html), the loss-curve plot and the model card (README.md of the merged model)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from llmneo.config import Config

FIDELITY_COLUMNS = ("kl_to_teacher", "top1_agreement", "perplexity")
MODEL_ORDER = ("base_student", "distilled", "teacher")
# the one number per lm-eval task shown in the comparison table (first one the task reports)
HEADLINE_METRICS = ("acc", "acc_norm", "exact_match", "bits_per_byte", "word_perplexity", "perplexity")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list], align_right: bool = True) -> str:
    """A plain-text table for terminals (monospace)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)), line]
    for r in cells[1:]:
        out.append("  ".join((c.rjust(w) if align_right and i else c.ljust(w))
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def html_table(headers: list[str], rows: list[list]) -> str:
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


def plot_loss(log: list[dict], out_png: Path) -> Path | None:
    """Loss / CE / KD per step as a PNG (matplotlib, headless)."""
    if not log:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in ("loss", "ce", "kd"):
        ax.plot(steps, [r[key] for r in log], label=key, marker="o" if len(steps) < 30 else None)
    val = [r for r in log if r.get("val_loss") is not None]  # distill.eval_every
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], label="val_loss", marker="s",
                linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("per-token loss")
    ax.set_title("distillation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


TRAIN_COLUMNS = ("step", "loss", "ce", "kd", "lr", "tokens_per_s")


def _train_rows(log: list[dict], last: int = 10) -> list[list]:
    return [[r.get(c) for c in TRAIN_COLUMNS] for r in log[-last:]]


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
    """report.md and report.html (PNG embedded, so the HTML is one self-contained file) in ``out_dir``."""
    out_dir = Path(out_dir)
    log = read_log(log_path)
    png = plot_loss(log, out_dir / "loss_curve.png")
    headers, rows = comparison(result)
    lm_headers, lm_rows = lm_eval_rows(result.get("lm_eval", {}))
    gate = result["gate"]
    title = f"llmneo evaluation — {cfg.name}"
    intro = (f"Method {result.get('method')}, teacher {result.get('teacher')}, student {result.get('student')}; "
             f"dataset hash {result.get('dataset_hash')}, config hash {result.get('config_hash')}.")
    md = [f"# {title}", "", intro, "",
          "## Base student, distilled student and teacher",
          "", "Fidelity columns are measured on the val split against the teacher "
          "(KL(teacher‖model) per token, top-1 agreement, perplexity on the labels); task columns come "
          "from lm-eval.", "", markdown_table(headers, rows), "",
          f"**Gate: {gate_line(gate)}** (thresholds: {', '.join(gate.get('thresholds', [])) or 'none'})", ""]
    if result.get("merge"):
        md += [f"Merge: {merge_line(result['merge'])}.", ""]
    if lm_rows:
        md += ["## lm-eval, every metric", "", markdown_table(lm_headers, lm_rows), ""]
    if log:
        md += ["## Training (last steps)", "", markdown_table(list(TRAIN_COLUMNS), _train_rows(log)), ""]
    if png:
        md += [f"![loss curve]({png.name})", ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    image = ""
    if png:
        data = base64.b64encode(png.read_bytes()).decode()
        image = f'<h2>Loss curves</h2><img alt="loss curve" src="data:image/png;base64,{data}">'
    badge = "pass" if gate["passed"] else "fail"
    body = [
        f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>",
        "<h2>Base student, distilled student and teacher</h2>", html_table(headers, rows),
        f'<p class="gate {badge}">Gate: {html.escape(gate_line(gate))}</p>',
        f"<p>thresholds: {html.escape(', '.join(gate.get('thresholds', [])) or 'none')}</p>",
    ]
    if result.get("merge"):
        body.append(f'<p class="merge">Merge: {html.escape(merge_line(result["merge"]))}.</p>')
    if lm_rows:
        body += ["<h2>lm-eval, every metric</h2>", html_table(lm_headers, lm_rows)]
    if log:
        body += ["<h2>Training (last steps)</h2>", html_table(list(TRAIN_COLUMNS), _train_rows(log))]
    body.append(image)
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
             "td:first-child,th{text-align:left}.gate{font-weight:bold;padding:.4em}.pass{background:#dfd}"
             ".fail{background:#fdd}")
    html_path = out_dir / "report.html"
    html_path.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                         f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return md_path, html_path


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
