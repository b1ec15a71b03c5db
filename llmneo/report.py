"""Human-facing outputs: the Markdown evaluation report, the loss-curve plot, the model card, tables."""

from __future__ import annotations

import json
from pathlib import Path

from llmneo.config import Config

FIDELITY_COLUMNS = ("kl_to_teacher", "top1_agreement", "perplexity")


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


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def fidelity_rows(fidelity: dict[str, dict]) -> list[list]:
    order = [k for k in ("base_student", "distilled", "teacher") if k in fidelity]
    order += [k for k in fidelity if k not in order]
    return [[name] + [fidelity[name][c] for c in FIDELITY_COLUMNS] for name in order]


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
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("per-token loss")
    ax.set_title("distillation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def write_report(out_dir: Path, result: dict, log_path: Path | None, cfg: Config) -> Path:
    out_dir = Path(out_dir)
    log = read_log(log_path)
    png = plot_loss(log, out_dir / "loss_curve.png")
    gate = result["gate"]
    lines = [
        f"# llmneo evaluation — {cfg.name}",
        "",
        f"Method **{result.get('method')}**, teacher `{result.get('teacher')}`, student `{result.get('student')}`.",
        "",
        "## Fidelity to the teacher (val split)",
        "",
        markdown_table(["model", *FIDELITY_COLUMNS], fidelity_rows(result["fidelity"])),
        "",
        f"**Gate: {'PASS' if gate['passed'] else 'FAIL'}**"
        + ("" if gate["passed"] else " — " + "; ".join(gate["reasons"])),
        "",
    ]
    if log:
        lines += ["## Training", "",
                  markdown_table(["step", "loss", "ce", "kd", "lr", "tokens/s"],
                                 [[r["step"], r["loss"], r["ce"], r["kd"], r["lr"], r["tokens_per_s"]]
                                  for r in log[-10:]]), ""]
    if png:
        lines += [f"![loss curve]({png.name})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_model_card(out_dir: Path, result: dict, cfg: Config) -> Path:
    d = cfg.distill
    text = f"""---
library_name: transformers
tags: [llmneo, distillation, lora]
---
# {cfg.registry.name}

Distilled with [llmneo](https://arxiv.org/abs/2411.06839) (LLM-NEO): method `{d.method}`,
loss (1-α)·CE + α·T²·{d.divergence} with α={d.alpha}, T={d.temperature}; LoRA r={d.lora_rank},
alpha={d.lora_alpha}; {d.max_steps} steps × {d.global_batch_size} sequences, lr {d.lr}.

- teacher: `{result.get('teacher')}`
- student (base): `{result.get('student')}`
- data: `{cfg.data.source}` (dataset hash `{result.get('dataset_hash')}`)
- config hash: `{result.get('config_hash')}`

## Evaluation (val split)

{markdown_table(["model", *FIDELITY_COLUMNS], fidelity_rows(result["fidelity"]))}
"""
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path
