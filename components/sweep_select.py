"""Component: the sweep's selection (rank the points, the winner for registration, the report)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Metrics, Model, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def select_sweep(overrides: list, metrics: list, models: Input[list[Model]], winner: Output[Model],
                 summary: Output[Metrics], report: Output[Markdown],
                 report_html: Output[HTML]) -> NamedTuple("Selection", [("Output", str), ("overrides", list)]):
    """Rank every point by its evaluation card, keep the winner, apply the gate, write the sweep report.

    Args:
        overrides: configuration overrides shared by every point (the table shows the rest).
        metrics: ranking metrics, best first by the first; ties broken by the next (min:NAME / max:NAME to set the direction).
        models: every point's merge-eval output (a failed point holds sweep_point.json with its error).
        winner: the winning model folder, with sweep.json (every point's overrides and metrics).
        summary: points, completed points, the winner's number and ranking metric.
        report: Markdown report: one row per point (settings, metrics, wall time, tokens/s, peak memory), winner marked.
        report_html: the same report as one HTML page, with the plot of the metric against each swept setting.

    Returns:
        Output: the gate, "pass" when the winner passed it (then it is registered), else "fail" (named
        Output like merge-eval's: kfp.local 2.17 resolves a condition on a task output only by that
        name); overrides: the winner's overrides.
    """
    import shutil
    import tempfile
    from collections import namedtuple

    from llmneo.errors import guarded
    from llmneo.sweep import select_winner

    folders = [m.path for m in models]
    pages = tempfile.mkdtemp(prefix="sweep-report-")
    table = guarded(select_winner, folders, list(overrides), list(metrics), winner.path, pages)
    shutil.copy(f"{pages}/report.md", report.path)
    shutil.copy(f"{pages}/report.html", report_html.path)
    done = [row for row in table["points"] if row["status"] == "ok"]
    summary.log_metric("points", len(table["points"]))
    summary.log_metric("completed_points", len(done))
    best = table["winner"]
    if best is not None:
        summary.log_metric("winner", best + 1)
        if table["winner_value"] is not None:
            summary.log_metric(f"winner_{table['metric_name']}", table["winner_value"])
    chosen = (table["points"][best]["overrides"] if best is not None else [])
    selection = namedtuple("Selection", ["Output", "overrides"])
    return selection(table["gate"], [*overrides, *chosen])
