"""Typed cards: round trip, unknown keys, missing/garbled cards as one-line errors, atomic write, the
step metrics; a failed re-run never leaves the previous card behind."""

import json

import pytest

from llmneo import cards
from llmneo.cards import DatasetCard, DistillCard, EvalCard, ModelCard, ModelCards, register_metrics
from llmneo.config import load_config
from llmneo.data import run_prep
from llmneo.errors import UserError
from llmneo.models import build_tiny_tokenizer
from llmneo.teacher import run_teacher


def test_round_trip_keeps_unknown_keys(tmp_path):
    DatasetCard(source="builtin:tiny", counts={"kept": 3}, dataset_hash="abc").write(tmp_path)
    data = json.loads((tmp_path / "card.json").read_text())
    data["added_by_a_newer_version"] = {"x": 1}
    (tmp_path / "card.json").write_text(json.dumps(data))
    card = DatasetCard.read(tmp_path)
    assert (card.source, card.counts, card.dataset_hash) == ("builtin:tiny", {"kept": 3}, "abc")
    assert card.extra == {"added_by_a_newer_version": {"x": 1}}
    card.write(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "card.json").read_text()) == data


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    DistillCard(method="neo", steps=2).write(tmp_path)
    before = (tmp_path / "card.json").read_text()

    def fail(*_):
        raise OSError("No space left on device")

    monkeypatch.setattr(cards.os, "replace", fail)
    with pytest.raises(OSError):
        DistillCard(method="neo", steps=3).write(tmp_path)
    assert (tmp_path / "card.json").read_text() == before  # the old card, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]


@pytest.mark.parametrize("content, message", [
    (None, r"^{d}: no card.json, not a completed dataset \(the prep step writes it last: run `llmneo prep` "
           r"into this folder\)$"),
    ('{"kind": "dataset", "cou', r"^{d}/card.json: unreadable dataset card: .*\(the prep step writes it last"),
    ("[1, 2]", r"^{d}/card.json: not a dataset card: not a JSON object"),
    ('{"kind": "model", "role": "teacher"}', r"^{d}/card.json: a 'model' card, not a dataset card"),
])
def test_missing_or_garbled_card_is_one_line_naming_file_and_step(tmp_path, content, message):
    if content is not None:
        (tmp_path / "card.json").write_text(content)
    with pytest.raises(UserError, match=message.format(d=tmp_path)) as e:
        DatasetCard.read(tmp_path)
    assert "\n" not in str(e.value)


def test_cards_of_one_kind_are_told_apart(tmp_path):
    ModelCard(role="teacher", source="tiny").write(tmp_path / "teacher")
    with pytest.raises(UserError, match="not a distill output card: no method"):
        DistillCard.read(tmp_path / "teacher")  # sft/kd distill cards share kind "model"
    with pytest.raises(UserError, match="not a merge-eval output card: no gate result"):
        EvalCard.read(tmp_path / "teacher")


def test_step_metrics_names_and_values():
    dataset = DatasetCard(seconds=1.5, rows_per_second=10.0, counts={"read": 12, "kept": 10},
                          rejected_by_kind={"duplicate": 2}, tokens={"total": 99, "truncated": 0, "loss_positions": {}})
    assert dataset.step_metrics() == {"seconds": 1.5, "rows_per_second": 10.0, "rows_read": 12, "rows_kept": 10,
                                      "rejected_duplicate": 2, "tokens_total": 99, "tokens_truncated": 0}
    pair = ModelCards(ModelCard(role="teacher", parameters=100, layers=4, seconds=2.0,
                                topk={"bytes": 7, "tokens": 5, "positions_per_second": 2.5}),
                      ModelCard(role="student", parameters=50, layers=2, seconds=2.0))
    assert pair.step_metrics() == {"seconds": 2.0, "teacher_parameters": 100, "teacher_layers": 4, "topk_bytes": 7,
                                   "topk_positions": 5, "topk_positions_per_second": 2.5,
                                   "student_parameters": 50, "student_layers": 2}
    distill = DistillCard(method="neo", final={"loss": 1.0, "ce": 2.0, "kd": 0.5}, tokens_per_s=30.0,
                          trainable_parameters=8, seconds=3.0, wall_seconds=4.0)
    assert distill.step_metrics() == {"seconds": 4.0, "final_loss": 1.0, "final_ce": 2.0, "final_kd": 0.5,
                                      "tokens_per_s": 30.0, "trainable_parameters": 8}
    ev = EvalCard(gate={"passed": False, "reasons": ["x"]}, seconds=5.0, metrics={"llmneo_mc/acc": 0.5},
                  summary={"distilled": {"kl_to_teacher": 0.2, "llmneo_mc/acc": 0.5}, "base_student": {"kl_to_teacher": 0.4}})
    assert ev.step_metrics() == {"seconds": 5.0, "gate_passed": 0.0, "distilled_kl_to_teacher": 0.2,
                                 "distilled_llmneo_mc_acc": 0.5, "base_student_kl_to_teacher": 0.4}
    assert ev.metadata() == {"gate": "fail", "llmneo_mc_acc": 0.5}
    assert "0.4000 (base) → 0.2000; gate FAIL: x" in ev.summary_line()
    assert register_metrics({"files": [{"size": 3}, {"size": 4}], "reused": True}, 1.234) == {
        "seconds": 1.23, "files": 2, "bytes": 7, "reused_existing_version": 1.0}


def test_failed_reprep_removes_the_old_card_and_the_teacher_step_refuses_the_folder(tmp_path):
    """Issue: prep into a folder, prep again with all-bad data: the old card survived and the
    teacher step accepted the folder. A step removes its card first and writes it last."""
    tok = build_tiny_tokenizer()
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"Q{i}?", "output": f"A{i}."}) + "\n" for i in range(6)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n" + json.dumps({"foo": "bar"}) + "\n")
    out = tmp_path / "dataset"
    run_prep(load_config("tiny", [f"data.source={good}", "data.min_rows=1"]), tok, out)
    assert DatasetCard.read(out).counts["kept"] == 6
    with pytest.raises(UserError, match="all 2 rows rejected"):
        run_prep(load_config("tiny", [f"data.source={bad}", "data.min_rows=1"]), tok, out)
    assert not (out / "card.json").exists()
    with pytest.raises(UserError) as e:
        run_teacher(load_config("tiny"), out, tmp_path / "teacher", tmp_path / "student")
    assert str(e.value) == (f"{out}: no card.json, not a completed dataset (the prep step writes it last: "
                            f"run `llmneo prep` into this folder)")
    assert not (tmp_path / "teacher" / "card.json").exists() and not (tmp_path / "student" / "card.json").exists()
