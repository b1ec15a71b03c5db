"""The evaluation report: model names from the cards, the cost of the distillation, the training
panels, and Markdown that renders in the KFP UI (no links to files it cannot reach)."""

import json

import pytest

from llmneo.config import load_config
from llmneo.report import (
    MD_IMAGE_BUDGET,
    distill_rows,
    markdown_table,
    model_name,
    plot_loss,
    table,
    write_report,
)

TEACHER = {"source": "hf:HuggingFaceTB/SmolLM2-360M-Instruct@abcdef0123456789", "revision": "abcdef0123456789",
           "layers": 32, "parameters": 361_821_120, "architecture": "LlamaForCausalLM", "dtype": "bfloat16"}


def result(method="neo", samples=True):
    fid = {"kl_to_teacher": 0.5, "top1_agreement": 0.6, "perplexity": 9.0}
    return {
        "fidelity": {"base_student": fid, "distilled": fid, "teacher": {**fid, "kl_to_teacher": 0.0}},
        "lm_eval": {"teacher": {"llmneo_mc": {"acc": 0.625, "acc_stderr": 0.05}},
                    "distilled": {"llmneo_mc": {"acc": 0.5}}},
        "gate": {"passed": True, "reasons": [], "thresholds": ["kl_to_teacher<=2"],
                 "compared": ["kl_to_teacher 0.5 <= 0.45 (base 0.5 × (1 - eval.min_kl_reduction 0.1)): fail"]},
        "method": method, "dataset": {"source": "builtin:smollm2_instruct"},
        "models": {"teacher": TEACHER,
                   "base_student": {"source": "prune", "kept_layers": [0, 1, 2, 3, 28, 29, 30, 31], "layers": 8,
                                    "parameters": 100_000_000, "pruned_from": TEACHER["source"]}},
        "distill": {"method": method, "steps": 30, "world_size": 2, "strategy": "ddp", "seconds": 61.5,
                    "wall_seconds": 80.25, "tokens_per_s": 812.4, "peak_mem_mb": 2048.0,
                    "trainable_parameters": 4_000_000, "final": {"loss": 1.5, "ce": 2.0, "kd": 1.25}},
        "samples": [{"prompt": "user\nWhat is the capital of France?\nassistant",
                     "reference": "Paris.", "outputs": {"teacher": "Paris.", "base_student": "A | B ```",
                                                        "distilled": "The capital of France is Paris."}}]
        if samples else [],
    }


def log_rows(kd=1.0, val=True):
    rows = [{"step": s, "loss": 3.0 / s, "ce": 5.0 / s, "kd": kd / s, "lr": 1e-3 * s, "tokens_per_s": 100.0}
            for s in (1, 2, 3, 4)]
    if val:
        rows[1]["val_loss"], rows[3]["val_loss"] = 2.5, 2.0
    return rows


def test_model_names_come_from_the_cards():
    assert model_name(TEACHER) == "HuggingFaceTB/SmolLM2-360M-Instruct @ abcdef0123"
    assert model_name({"source": "smollm2"}) == "SmolLM2-135M-Instruct (packaged GGUF, bf16)"
    assert model_name({"source": "prune", "kept_layers": [0, 1, 2, 3, 28, 29, 30, 31]}, TEACHER) == (
        "HuggingFaceTB/SmolLM2-360M-Instruct @ abcdef0123, pruned to 8 of 32 layers (0-3, 28-31)")
    assert model_name({"source": "s3://bucket/models/x"}) == "s3://bucket/models/x"


def test_distill_rows_show_time_throughput_and_memory():
    rows = dict(distill_rows(result()))
    assert rows["wall time of the step"] == "80.2 s" and rows["training time"] == "61.5 s"
    assert rows["throughput"] == "812 tokens/s" and rows["peak memory (per process)"] == "2.00 GiB"
    assert rows["processes"] == "2 (ddp)" and rows["final loss / CE / KD"] == "1.5000 / 2.0000 / 1.2500"
    assert distill_rows({}) == []


def test_report_sections_samples_and_embedded_curves(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in log_rows()))
    md_path, html_path = write_report(tmp_path, result(), log, load_config("tiny"))
    md, page = md_path.read_text(), html_path.read_text()
    for text in ("## Models", "pruned to 8 of 32 layers (0-3, 28-31)", "## Sample generations",
                 "The capital of France is Paris.", "## Distillation run", "812 tokens/s", "| val\\_loss ",
                 "| teacher   | llmneo\\_mc | acc      | 0.625   | 0.05     |",
                 "Compared with the base student: kl\\_to\\_teacher 0.5 \\<= 0.45 (base 0.5 × (1 - "
                 "eval.min\\_kl\\_reduction 0.1)): fail"):
        assert text in md, text
    # a generation holding ``` cannot close its fence early
    assert "````\nA | B ```\n````" in md
    image = md.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert 0 < len(image) <= MD_IMAGE_BUDGET and "loss_curve.png)" not in md
    assert f'src="data:image/png;base64,{image}"' in page
    assert "<pre>The capital of France is Paris.</pre>" in page and "A | B ```" in page
    assert "Compared with the base student: kl_to_teacher 0.5 &lt;= 0.45 (base 0.5" in page
    assert "&lt;" not in md  # Markdown is not HTML-escaped; the KFP viewer does not parse raw HTML anyway


def test_training_table_has_only_the_terms_that_exist(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in log_rows(kd=0.0, val=False)))
    md = write_report(tmp_path, result(method="sft", samples=False), log, load_config("tiny"))[0].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| step"))
    assert [c.strip().replace("\\_", "_") for c in header.strip("|").split("|")] == [
        "step", "loss", "ce", "lr", "tokens_per_s"]
    assert "## Sample generations" not in md


@pytest.mark.parametrize("kd", [1.0, 0.0])
def test_curves_have_one_panel_per_quantity(tmp_path, kd):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = {}
    original = plt.Figure.savefig

    def keep(fig, path, *a, **k):
        saved["titles"] = [ax.get_title() for ax in fig.axes]
        saved["kd_scale"] = fig.axes[1].get_yscale()
        saved["kd_lines"] = len(fig.axes[1].lines)
        return original(fig, path, *a, **k)

    plt.Figure.savefig = keep
    try:
        assert plot_loss(log_rows(kd=kd), tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        plt.Figure.savefig = original
    assert saved["titles"] == ["training loss and CE (labels)", "KD: divergence to the teacher",
                               "learning rate", "validation loss (val split)"]
    assert (saved["kd_scale"], saved["kd_lines"]) == (("log", 1) if kd else ("linear", 0))
    assert plot_loss([], tmp_path / "none.png") is None


def test_tables_use_tabulate_and_fit_a_width():
    text = table(["key", "type", "description"], [["distill.alpha", "float", "word " * 40]],
                 align_right=False, max_width=60)
    assert max(len(line) for line in text.splitlines()) <= 60
    assert " ".join(text.split()).count("word") == 40  # wrapped, nothing lost
    assert table(["a", "b"], [["x", 1.23456], ["yy", None]]).splitlines() == ["a        b", "---  -----",
                                                                              "x    1.235", "yy       -"]
    assert markdown_table(["a"], [["x|y\nz"]]).splitlines()[2] == "| x\\|y z |"
    # _ and * would start emphasis in the KFP UI's Markdown viewer: kl_to_teacher → "kltoteacher"
    assert markdown_table(["kl_to_teacher"], [["a*b"]]).splitlines()[::2] == ["| kl\\_to\\_teacher   |",
                                                                             "| a\\*b              |"]


@pytest.mark.parametrize("online", [True, False])
def test_validation_panel_plots_like_against_like(tmp_path, online):
    """teacher.mode=offline: validation has no KD term (the top-k cache holds the train split only), so
    its loss is the raw CE; the panel puts it beside the training CE, not the weighted training loss.
    With an online teacher both sides are the weighted loss (1-α)·CE + α·KD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = log_rows(kd=1.0)
    for r in log:
        if "val_loss" in r:
            r["val_ce"] = r["val_loss"] if not online else r["val_loss"] + 1.0
            if online:
                r["val_kd"] = 0.5
    saved = {}
    original = plt.Figure.savefig

    def keep(fig, path, *a, **k):
        saved["lines"] = {line.get_label(): list(line.get_ydata()) for line in fig.axes[3].lines}
        return original(fig, path, *a, **k)

    plt.Figure.savefig = keep
    try:
        plot_loss(log, tmp_path / "c.png")
    finally:
        plt.Figure.savefig = original
    name, key = ("loss", "loss") if online else ("CE", "ce")
    assert saved["lines"] == {f"val {name}": [r[f"val_{key}"] for r in log if "val_loss" in r],
                              f"train {name}": [r[key] for r in log]}


def test_report_shows_the_teacher_written_answers(tmp_path):
    """data.answers=teacher: the report says who wrote the training answers, how, and shows a few."""
    res = result()
    res["dataset"]["generated"] = {
        "answers": "teacher", "teacher": {"source": "smollm2", "fingerprint": "0123abcd"},
        "generation": {"temperature": 0.0, "max_new_tokens": 192}, "counts": {"answered": 12, "kept": 11},
        "rejected_by_kind": {"truncated": 1},
        "samples": [{"row": 1, "messages": [{"role": "user", "content": "Who wrote Hamlet?"},
                                            {"role": "assistant", "content": "Shakespeare <3"}]}]}
    md_path, html_path = write_report(tmp_path, res, tmp_path / "none.jsonl", load_config("tiny"))
    md, page = md_path.read_text(), html_path.read_text()
    line = ("The training answers were written by the teacher (smollm2, fingerprint 0123abcd; data.answers=teacher): "
            "greedy, at most 192 new tokens; 12 records answered, 11 kept; rejected: truncated 1.")
    assert "## Teacher-written answers" in md and "[assistant] Shakespeare <3" in md
    assert "[assistant] Shakespeare &lt;3" in page and "<h2>Teacher-written answers</h2>" in page
    assert line.replace("data.answers", "data\\.answers") in md or line in md
