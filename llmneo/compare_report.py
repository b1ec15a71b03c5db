"""The comparison's outputs (``llmneo compare``, :mod:`llmneo.compare`): the per-method summary of the
runs, the table (Markdown and terminal) and the plot (PNG).

    result = run_compare(cfg, out)          # llmneo.compare: trains and evaluates, writes these
    summarize(result["runs"])               # mean (± spread) per method × grid point
    table_rows(result), markdown(result)    # the table
    plot(result, out / "compare.png")       # one panel per metric
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from llmneo.report import markdown_table, table

METHOD_LABELS = {"base": "pruned student (untouched)", "sft": "SFT (full)", "lora": "LoRA (CE)",
                 "kd": "KD (full)", "neo": "NEO (LoRA + KD)", "teacher": "teacher"}
METHOD_COLORS = {"base": "#9e9e9e", "sft": "#1f77b4", "lora": "#2ca02c", "kd": "#ff7f0e", "neo": "#d62728",
                 "teacher": "#444444"}
MC_METRIC = "llmneo_mc/acc"
# (metric, column title, better direction): the columns of the table and the panels of the plot
COLUMNS = [("kl_to_teacher", "KL to teacher ↓", "lower"), ("top1_agreement", "top-1 agreement ↑", "higher"),
           ("perplexity", "perplexity ↓", "lower"), (MC_METRIC, "llmneo_mc acc ↑", "higher")]


def grid_columns(grid: dict[str, list[str]]) -> list[str]:
    """Config keys a grid varies, one table column each (``distill.lr`` is the table's lr column)."""
    return [k for key in grid for k in key.split("+") if k != "distill.lr"]


def summarize(records: list[dict]) -> list[dict]:
    """One row per method × grid point: the mean over seeds of each metric, the spread (sample std;
    with one seed the lm-eval stderr instead) and the mean training wall time."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
    rows = []
    for group, members in groups.items():
        first = members[0]
        row = {"group": group, "method": first["method"], "point": first["point"], "seeds": len(members),
               "lr": first.get("lr"), "trainable_parameters": first.get("trainable_parameters"),
               "mean": {}, "spread": {}}
        for metric, _, _ in COLUMNS:
            values = [m["metrics"][metric] for m in members if metric in m["metrics"]]
            if not values:
                continue
            row["mean"][metric] = statistics.fmean(values)
            if len(values) > 1:
                row["spread"][metric] = statistics.stdev(values)
            elif metric in first.get("stderr", {}):
                row["spread"][metric] = first["stderr"][metric]
        walls = [m["train_wall_seconds"] for m in members if m.get("train_wall_seconds") is not None]
        row["train_wall_seconds"] = statistics.fmean(walls) if walls else None
        rows.append(row)
    return rows


def _cell(row: dict, metric: str) -> str:
    if metric not in row["mean"]:
        return "-"
    value = row["mean"][metric]
    text = f"{value:.3g}" if metric == "perplexity" else f"{value:.3f}"
    if metric in row["spread"]:
        spread = row["spread"][metric]
        text += f" ± {spread:.2g}" if metric == "perplexity" else f" ± {spread:.3f}"
    return text


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the comparison table (also the terminal table)."""
    grid_keys = grid_columns(result.get("grid", {}))
    headers = ["method", *grid_keys, "lr", "trained params", *[title for _, title, _ in COLUMNS], "train wall s"]
    rows = []
    for row in result["rows"]:
        label = METHOD_LABELS.get(row["method"], row["method"])
        lr = "-" if row["lr"] is None else f"{row['lr']:g}"
        params = "-" if not row.get("trainable_parameters") else f"{row['trainable_parameters'] / 1e6:.2f}M"
        wall = "-" if row["train_wall_seconds"] is None else f"{row['train_wall_seconds']:.0f}"
        rows.append([label, *[row["point"].get(k, "") for k in grid_keys], lr, params,
                     *[_cell(row, metric) for metric, _, _ in COLUMNS], wall])
    return headers, rows


def best_groups(result: dict) -> dict[str, str]:
    """metric → the trained run (not base, not teacher) that does best on it."""
    trained = [r for r in result["rows"] if r["method"] not in ("base", "teacher")]
    best = {}
    for metric, _, better in COLUMNS:
        candidates = [r for r in trained if metric in r["mean"]]
        if candidates:
            pick = (min if better == "lower" else max)(candidates, key=lambda r: r["mean"][metric])
            best[metric] = pick["group"]
    return best


def markdown(result: dict) -> str:
    headers, rows = table_rows(result)
    seeds = result.get("seeds", [])
    spread = ("± = standard deviation over seeds (rows of a single run: lm-eval's standard error)"
              if len(seeds) > 1 else "± = lm-eval's standard error (one seed)")
    best = best_groups(result)
    lines = [f"# Method comparison — {result['preset']}", "",
             f"Same data, {result['steps']} optimizer steps of {result['global_batch_size']} sequences, "
             f"seed(s) {', '.join(map(str, seeds))}, torchrun × {result['nproc_per_node']}. Fidelity on the "
             f"val split (KL(teacher‖model) per token, top-1 agreement with the teacher, perplexity of "
             f"the labels); {spread}. Total wall time {result['wall_seconds']:.0f} s.", "",
             markdown_table(headers, rows), ""]
    if best:
        lines += ["Best trained run per column: " + "; ".join(
            f"{title.rstrip(' ↑↓')}: {best[m]}" for m, title, _ in COLUMNS if m in best), ""]
    return "\n".join(lines)


SHORT_LABELS = {"base": "untouched", "sft": "SFT", "lora": "LoRA", "kd": "KD", "neo": "NEO"}
SHORT_KEYS = {"lora_rank": "r", "alpha": "α"}


def _label(row: dict) -> str:
    """``NEO r=64 lora_alpha=128 lr=1e-3``: the method and its grid point, short."""
    items = [f"{SHORT_KEYS.get(k.split('.')[-1], k.split('.')[-1])}={v}" for k, v in row["point"].items()]
    return " ".join([SHORT_LABELS.get(row["method"], row["method"]), *items])


def _annotate(value: float, metric: str) -> str:
    return f"{value:.3g}" if metric == "perplexity" else f"{value:.2f}"


def plot(result: dict, out_png: Path) -> Path:
    """One panel per metric, one bar per row (method × grid point); the teacher and chance as lines.

    Up to 6 rows: vertical bars, the four panels side by side; a sweep (more rows): horizontal bars,
    panels 2 × 2, so long labels stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [r for r in result["rows"] if r["method"] != "teacher"]
    teacher = next((r for r in result["rows"] if r["method"] == "teacher"), None)
    labels = [_label(r) for r in rows]
    sweep = len(rows) > 6
    if sweep:
        fig, axes = plt.subplots(2, 2, figsize=(13.0, 2.0 + 0.55 * len(rows)), dpi=80)
        axes = list(axes.flat)
    else:
        fig, axes = plt.subplots(1, len(COLUMNS), figsize=(15.0, 4.2), dpi=80)
    position = list(range(len(rows)))
    colors = [METHOD_COLORS.get(r["method"], "#777") for r in rows]
    for ax, (metric, title, _better) in zip(axes, COLUMNS, strict=True):
        values = [r["mean"].get(metric, float("nan")) for r in rows]
        errors = [r["spread"].get(metric, 0.0) for r in rows]
        value_axis = ax.xaxis if sweep else ax.yaxis
        if sweep:
            ax.barh(position, values, color=colors, height=0.7)
            if any(errors):
                ax.errorbar(values, position, xerr=errors, fmt="none", ecolor="#222", capsize=3, lw=1)
            ax.set_yticks(position)
            ax.set_yticklabels(labels, fontsize=9)
            ax.invert_yaxis()  # first row on top, as in the table
        else:
            ax.bar(position, values, color=colors, width=0.7)
            if any(errors):
                ax.errorbar(position, values, yerr=errors, fmt="none", ecolor="#222", capsize=3, lw=1)
            ax.set_xticks(position)
            ax.set_xticklabels(labels, fontsize=9)
        for pos, v, e in zip(position, values, errors, strict=True):
            if v != v:  # NaN: not measured
                continue
            tip = v * (1 + e / v if v else 1) if metric == "perplexity" else v + e
            if sweep:
                ax.annotate(_annotate(v, metric), (tip, pos), ha="left", va="center", fontsize=8,
                            xytext=(3, 0), textcoords="offset points")
            else:
                ax.annotate(_annotate(v, metric), (pos, tip), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 2), textcoords="offset points")
        set_scale, set_lim, reference = ((ax.set_xscale, ax.set_xlim, ax.axvline) if sweep
                                         else (ax.set_yscale, ax.set_ylim, ax.axhline))
        if metric == "perplexity":
            set_scale("log")
            value_axis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            value_axis.set_minor_formatter(NullFormatter())
        if teacher and metric in teacher["mean"] and metric != "kl_to_teacher":
            reference(teacher["mean"][metric], color=METHOD_COLORS["teacher"], ls="--", lw=1.2)
        if metric == MC_METRIC:
            reference(0.25, color="#888", ls=":", lw=1.2)
            set_lim(0, 1)
        elif metric == "top1_agreement":
            set_lim(0, 1.05)
        else:
            low, high = (ax.get_xlim() if sweep else ax.get_ylim())
            set_lim(low, high * (1.6 if metric == "perplexity" else 1.1))
        ax.set_title(title, fontsize=11)
        ax.grid(axis="x" if sweep else "y", alpha=0.3)
    handles = [Line2D([], [], color=METHOD_COLORS["teacher"], ls="--", label="teacher"),
               Line2D([], [], color="#888", ls=":", label="chance (4 choices)")]
    fig.legend(handles=handles, loc="upper right", fontsize=9, frameon=False, ncol=2)
    error_note = ("error bars: std over seeds (single runs: lm-eval stderr)" if len(result.get("seeds", [])) > 1
                  else "error bars: lm-eval stderr")
    fig.suptitle(f"{result['preset']}: {result['steps']} steps × {result['global_batch_size']} sequences, same data "
                 f"and seed(s); fidelity on the val split; {error_note}", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95 if not sweep else 1 - 0.4 / fig.get_figheight()))
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def print_summary(result: dict, out: Path) -> None:
    headers, rows = table_rows(result)
    print("\n" + table(headers, rows, align_right=False))
    print(f"\ntotal wall time {result['wall_seconds']:.0f} s")
    print(f"table:  {out / 'compare.md'}\nplot:   {out / 'compare.png'}\nruns:   {out / 'compare.json'}",
          file=sys.stdout, flush=True)
