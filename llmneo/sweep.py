"""A sweep: one dataset and one teacher, many students (grid points), the best one chosen.

    llmneo sweep --preset tiny --grid distill.alpha=0.5,0.9 --grid distill.lora_rank=16,64

The Kubeflow pipeline (``pipelines/llm_neo_sweep.py``) runs data prep and teacher loading once, then
distill → merge-and-evaluate for every grid point, then :func:`select_winner`. This module is the
library side of it and knows nothing of KFP:

- :func:`plan_points` — the grid (``KEY=V1,V2`` texts, the syntax of ``llmneo compare --grid``)
  expanded into points, each the complete list of overrides of its run;
- :class:`PointGuard` — inside a sweep point's step (``$LLMNEO_SWEEP_POINT=1``), a failure is written
  as ``sweep_point.json`` (status ``failed``, the error line) instead of failing the task, so one
  failing point does not stop the others; the next step of that point passes the failure on;
- :func:`select_winner` — ranks the points by their evaluation cards (default KL to the teacher on
  the val split, lower is better; ties broken by the next metric), applies the gate to the winner,
  copies it with ``sweep.json`` (the whole sweep table: it goes into the registered lineage) and
  writes the report (Markdown, HTML, and a plot of the metric against each swept setting).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from llmneo.cards import EvalCard
from llmneo.errors import UserError, first_line

# llmneo.compare / llmneo.report (tabulate, matplotlib) are imported where used: the register step
# reads the winner's lineage (winner_lineage) in the light image.

POINT_ENV = "LLMNEO_SWEEP_POINT"  # "1" in the point steps of the sweep pipeline
POINT_FILE = "sweep_point.json"  # a point step's outcome: {"status", "overrides", "step", "error"}
SWEEP_FILE = "sweep.json"  # the sweep table, in the winner's folder (and so in its registered lineage)
DEFAULT_METRICS = ["kl_to_teacher", "top1_agreement", "perplexity"]
# sections that data prep and teacher loading read: the sweep runs them once, so a grid may not vary them
SHARED_SECTIONS = ("data", "teacher", "student")
LOWER_IS_BETTER = ("kl", "perplexity", "ppl", "loss")


# --------------------------------------------------------------------------------------------
# The plan: grid → points
# --------------------------------------------------------------------------------------------


def plan_points(overrides: list[str], grid: list[str], resolve: Callable[[list[str]], object]) -> list[list[str]]:
    """Every grid point as its complete overrides: ``overrides`` then the point's ``key=value`` in grid
    order. ``resolve(overrides)`` validates one point's configuration (a mistake is a
    :class:`UserError` naming the point). Identical points appear once, so a point's inputs — and
    with them its KFP cache key — depend on its configuration only, not on the rest of the grid."""
    from llmneo.compare import grid_points, parse_grid

    axes = parse_grid(list(grid))
    for key in (k for axis in axes for k in axis.split("+")):
        if key.split(".", 1)[0] in SHARED_SECTIONS:
            raise UserError(f"--grid {key}: the sweep prepares the data and loads the teacher once; sweep "
                            f"distill.* or eval.* settings (or run one pipeline per {key.split('.', 1)[0]} setting)")
    points: list[list[str]] = []
    for point in grid_points(axes):
        full = [*overrides, *(f"{k}={v}" for k, v in point.items())]
        try:
            resolve(full)
        except UserError as e:
            raise UserError(f"grid point {' '.join(f'{k}={v}' for k, v in point.items())}: {e}") from None
        if full not in points:
            points.append(full)
    return points


# --------------------------------------------------------------------------------------------
# A point's step: failures recorded, not raised
# --------------------------------------------------------------------------------------------


def read_point(folder: str | Path) -> dict | None:
    """A point step's recorded outcome (``sweep_point.json``), or None."""
    path = Path(folder) / POINT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class PointGuard:
    """``with PointGuard(out, overrides, "distill") as point: ...`` around a component's body.

    Outside a sweep (``$LLMNEO_SWEEP_POINT`` unset) it does nothing. In a sweep point: on success it
    records ``{"status": "ok"}`` in ``out``; on a failure (an ``error:`` exit or any exception) it
    records ``{"status": "failed", "error": ...}`` and swallows it, so the task succeeds and the sweep
    goes on. With ``upstream`` (the previous step's folder) holding a failure, ``point.run`` is False:
    the body is skipped and the failure is passed on."""

    def __init__(self, out: str | Path, overrides: list, step: str, upstream: str | Path | None = None,
                 env: dict | None = None):
        self.out, self.overrides, self.step = Path(out), list(overrides), step
        self.active = (os.environ if env is None else env).get(POINT_ENV) == "1"
        before = read_point(upstream) if (self.active and upstream is not None) else None
        self.upstream_failure = before if before and before.get("status") == "failed" else None

    @property
    def run(self) -> bool:
        return self.upstream_failure is None

    def error_line(self) -> str:
        """The recorded failure, as one line (after the ``with`` block)."""
        outcome = read_point(self.out) or {}
        return f"{outcome.get('failed_step', self.step)}: {outcome.get('error', '')}"

    def _record(self, **fields) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"overrides": self.overrides, "step": self.step, **fields}
        (self.out / POINT_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def __enter__(self) -> PointGuard:
        if self.active and self.upstream_failure:
            self._record(status="failed", error=self.upstream_failure.get("error", ""),
                         failed_step=self.upstream_failure.get("failed_step", self.upstream_failure.get("step")))
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if not self.active:
            return False
        if error is None:
            if self.run:
                self._record(status="ok")
            return False
        if isinstance(error, SystemExit) and error.code in (0, None):
            return False
        if not isinstance(error, (SystemExit, Exception)):
            return False  # KeyboardInterrupt and the like stop the task
        message = getattr(error, "llmneo_error", None) or (
            f"exit code {error.code} (see the step's log)" if isinstance(error, SystemExit)
            else f"{type(error).__name__}: {first_line(error)}")
        self._record(status="failed", error=message, failed_step=self.step)
        print(f"sweep point failed in {self.step}: {message}; the sweep goes on without it",
              file=sys.stderr, flush=True)
        return True


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def parse_metric(spec: str) -> tuple[str, bool]:
    """``"kl_to_teacher"`` → (name, lower is better); ``"min:NAME"`` / ``"max:NAME"`` say it explicitly.
    By default names with kl, perplexity, ppl or loss are lower-is-better, others higher-is-better."""
    spec = str(spec).strip()
    direction, _, name = spec.rpartition(":") if spec.startswith(("min:", "max:")) else ("", "", spec)
    if not name:
        raise UserError(f"sweep metric {spec!r}: expected a metric name such as kl_to_teacher (or min:NAME / max:NAME)")
    lower = direction == "min" if direction else any(w in name.lower() for w in LOWER_IS_BETTER)
    return name, lower


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def point_row(folder: str | Path | None, base: list[str]) -> dict:
    """One point's row of the sweep table, from its merge-eval folder: its overrides (those beyond the
    sweep's own), status, metrics (its :class:`EvalCard`), gate, and the training's wall time,
    throughput and peak memory (``eval.json`` ``distill``)."""
    outcome = read_point(folder) if folder else None
    overrides = list((outcome or {}).get("overrides", []))
    row = {"overrides": overrides[len(base):] if overrides[:len(base)] == base else overrides,
           "folder": str(folder) if folder else None, "status": "failed", "metrics": {}, "gate": None}
    if outcome is None:
        row["error"] = "no result recorded (the step did not finish)"
        return row
    if outcome.get("status") != "ok":
        row["error"] = f"{outcome.get('failed_step', outcome.get('step'))}: {outcome.get('error', '')}"
        return row
    try:
        card = EvalCard.read(folder)
        facts = json.loads((Path(folder) / "eval.json").read_text()).get("distill", {})
    except (UserError, OSError, ValueError) as e:
        row["error"] = f"merge-eval: {first_line(e)}"
        return row
    row.update(status="ok", metrics=dict(card.metrics), gate="pass" if card.passed else "fail",
               gate_reasons=list(card.gate.get("reasons", [])), config_hash=card.config_hash,
               wall_seconds=facts.get("wall_seconds", facts.get("seconds")),
               tokens_per_s=facts.get("tokens_per_s"), peak_mem_mb=facts.get("peak_mem_mb"))
    return row


def rank(rows: list[dict], metrics: list[str]) -> list[int]:
    """Indices of the completed rows, best first: by the first metric, ties broken by the next ones
    (a row missing a metric ranks after those that have it)."""
    specs = [parse_metric(m) for m in metrics]

    def key(i: int):
        out = []
        for name, lower in specs:
            value = _number(rows[i]["metrics"].get(name))
            out.append((1, 0.0) if value is None else (0, value if lower else -value))
        return (*out, i)

    done = [i for i, row in enumerate(rows) if row["status"] == "ok"]
    for name, _ in specs[:1]:
        if done and all(_number(rows[i]["metrics"].get(name)) is None for i in done):
            known = sorted({k for i in done for k in rows[i]["metrics"]})
            raise UserError(f"sweep metric {name!r}: no point has it; known: {', '.join(known)}")
    return sorted(done, key=key)


def select_winner(folders: list[str | Path], base_overrides: list[str], metrics: list[str],
                  winner_out: str | Path, report_dir: str | Path) -> dict:
    """Rank the points' merge-eval folders, copy the winner into ``winner_out`` with ``sweep.json``,
    write ``report.md``, ``report.html`` and ``sweep.png`` into ``report_dir``; returns the sweep table
    (``winner``: the winner's index, or None when every point failed; ``gate``: "pass"/"fail")."""
    metrics = list(metrics) or list(DEFAULT_METRICS)
    for m in metrics:
        parse_metric(m)
    rows = [point_row(f, list(base_overrides)) for f in folders]
    order = rank(rows, metrics)
    winner = order[0] if order else None
    for place, i in enumerate(order, 1):
        rows[i]["rank"] = place
    for i, row in enumerate(rows):
        row["winner"] = i == winner
    name = parse_metric(metrics[0])[0]
    table = {"metric": metrics[0], "metric_name": name, "metrics": metrics, "base_overrides": list(base_overrides),
             "settings": swept_settings(rows), "winner": winner,
             "gate": rows[winner]["gate"] if winner is not None else "fail",
             "winner_value": rows[winner]["metrics"].get(name) if winner is not None else None, "points": rows}
    winner_out, report_dir = Path(winner_out), Path(report_dir)
    winner_out.mkdir(parents=True, exist_ok=True)
    if winner is not None:
        shutil.copytree(rows[winner]["folder"], winner_out, dirs_exist_ok=True)
    lineage = {**table, "points": [{k: v for k, v in r.items() if k != "folder"} for r in rows]}
    (winner_out / SWEEP_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    write_report(table, report_dir)
    return table


def swept_settings(rows: list[dict]) -> list[str]:
    """The keys that the points set (in first-seen order)."""
    keys: list[str] = []
    for row in rows:
        for item in row["overrides"]:
            key = item.split("=", 1)[0]
            if key not in keys:
                keys.append(key)
    return keys


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _setting(row: dict, key: str) -> str:
    values = [o.split("=", 1)[1] for o in row["overrides"] if o.split("=", 1)[0] == key]
    return values[-1] if values else ""


def _fmt(value, digits: int = 4) -> str:
    number = _number(value)
    if number is None:
        return "-"
    return f"{number:.{digits}g}" if abs(number) < 1e5 else f"{number:.0f}"


def table_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    """The report's table: one row per point, the winner marked."""
    settings, metrics = table["settings"], [parse_metric(m)[0] for m in table["metrics"]]
    headers = ["", "#", *settings, "status", *metrics, "gate", "wall s", "tok/s", "peak MiB"]
    rows = []
    for i, row in enumerate(table["points"]):
        status = "ok" if row["status"] == "ok" else f"failed: {row.get('error', '')}"
        rows.append(["★ winner" if row["winner"] else "", str(i + 1), *(_setting(row, k) for k in settings), status,
                     *(_fmt(row["metrics"].get(m)) for m in metrics), row["gate"] or "-",
                     _fmt(row.get("wall_seconds"), 3), _fmt(row.get("tokens_per_s"), 4), _fmt(row.get("peak_mem_mb"), 4)])
    return headers, rows


def headline(table: dict) -> str:
    ok = sum(row["status"] == "ok" for row in table["points"])
    n = len(table["points"])
    if table["winner"] is None:
        return f"Every one of the {n} points failed: nothing is registered."
    row = table["points"][table["winner"]]
    name, lower = parse_metric(table["metric"])
    setting = " ".join(row["overrides"]) or "(the base configuration)"
    gate = ("passes the gate and is registered" if row["gate"] == "pass"
            else "fails the gate (" + "; ".join(row.get("gate_reasons", [])) + "): not registered")
    return (f"Winner: point {table['winner'] + 1} ({setting}), {name} {_fmt(row['metrics'].get(name))} "
            f"({'lower' if lower else 'higher'} is better; {ok} of {n} points completed); it {gate}.")


def plot(table: dict, out_png: Path) -> Path | None:
    """The ranking metric against each swept setting (one panel per setting), the winner marked."""
    settings, (name, lower) = table["settings"], parse_metric(table["metric"])
    done = [(i, row) for i, row in enumerate(table["points"]) if _number(row["metrics"].get(name)) is not None]
    if not settings or not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for ax, key in zip(axes[0], settings, strict=True):
        values = [_setting(row, key) for _, row in done]
        numeric = all(_number(_try_float(v)) is not None for v in values)
        labels = sorted(set(values), key=lambda v: float(v) if numeric else v)
        xs = [float(v) if numeric else labels.index(v) for v in values]
        ys = [float(row["metrics"][name]) for _, row in done]
        ax.scatter(xs, ys, color="tab:blue", label="point")
        for (_, row), x, y in zip(done, xs, ys, strict=True):
            if row["winner"]:
                ax.scatter([x], [y], s=160, marker="*", color="tab:red", zorder=3, label="winner")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif len({float(v) for v in labels}) > 1 and min(float(v) for v in labels) > 0 and \
                max(float(v) for v in labels) / min(float(v) for v in labels) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{name} ({'lower' if lower else 'higher'} is better)")
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    axes[0][0].legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _try_float(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def write_report(table: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``report.md`` and a self-contained ``report.html`` (the plot inlined), plus ``sweep.png``."""
    from llmneo.report import html_table, markdown_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headers, rows = table_rows(table)
    png = plot(table, out_dir / "sweep.png")
    ranked = ", then ".join(parse_metric(m)[0] for m in table["metrics"])
    md = ["# Sweep", "", headline(table), "", f"Ranked by {ranked}.", "", markdown_table(headers, rows), ""]
    inline = f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" if png else ""
    if png is not None:  # inlined: the report is shown alone (a KFP Markdown artifact), without sweep.png
        md += [f"![{table['metric']} against each swept setting]({inline})", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    image = (f'<img alt="{html.escape(table["metric"])} against each swept setting" src="{inline}">' if png else "")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Sweep</title>"
            "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
            f"<h1>Sweep</h1><p>{html.escape(headline(table))}</p><p>Ranked by {html.escape(ranked)}.</p>"
            f"{html_table(headers, rows)}{image}</body></html>\n")
    (out_dir / "report.html").write_text(page)
    return out_dir / "report.md", out_dir / "report.html"


def winner_lineage(model_dir: str | Path) -> dict | None:
    """The sweep table stored with a sweep's winner (``sweep.json``), for its registered lineage."""
    path = Path(model_dir) / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON") from None

