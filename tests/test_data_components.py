"""The prep and teacher KFP components' bodies (python_func): what they log as Metrics and metadata."""

import json

import pytest

from llmneo.cards import DatasetCard


class FakeArtifact:
    """The attributes a component body uses of kfp's Dataset/Model/Metrics artifacts."""

    def __init__(self, path):
        self.path = str(path)
        self.metadata = {}
        self.metrics = {}

    def log_metric(self, key, value):
        self.metrics[key] = value


def given_answers(tmp_path, overrides):
    """The generate component's output with data.answers=given: a card only (prep reads data.source)."""
    from llmneo_components.generate import generate_answers

    answers, metrics = FakeArtifact(tmp_path / "answers"), FakeArtifact(tmp_path / "m0")
    generate_answers.python_func(preset="tiny", config="", overrides=overrides, answers=answers, metrics=metrics)
    assert answers.metadata["answers"] == "given" and not (tmp_path / "answers" / "answers.jsonl").exists()
    return answers


def test_prep_and_teacher_components_log_counts_rejects_and_topk(tmp_path):
    from llmneo_components.prep import prep_data
    from llmneo_components.teacher import load_teacher

    src = tmp_path / "in.jsonl"
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(10)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n" + json.dumps(rows[0]) + "\n")
    overrides = [f"data.source={src}", "teacher.mode=offline", "teacher.topk=4"]
    answers = given_answers(tmp_path, overrides)
    dataset, metrics = FakeArtifact(tmp_path / "dataset"), FakeArtifact(tmp_path / "m1")
    prep_data.python_func(preset="tiny", config="", overrides=overrides, answers=answers, dataset=dataset,
                          metrics=metrics)
    card = DatasetCard.read(tmp_path / "dataset")
    m = metrics.metrics
    assert (m["rows_read"], m["rows_kept"], m["rows_rejected"]) == (12, 10, 2)
    assert m["rejected_invalid_json"] == 1 and m["rejected_duplicate"] == 1
    assert m["rows_train"] + m["rows_val"] == 10 and m["tokens_total"] == card.tokens["total"]
    assert dataset.metadata["dataset_hash"] == card.dataset_hash

    teacher, student, metrics2 = (FakeArtifact(tmp_path / n) for n in ("teacher", "student", "m2"))
    load_teacher.python_func(preset="tiny", config="", overrides=overrides, dataset=dataset, teacher=teacher,
                             student=student, metrics=metrics2)
    m = metrics2.metrics
    assert m["teacher_layers"] == 4 and m["student_layers"] == 2 and m["teacher_parameters"] > m["student_parameters"]
    meta = json.loads((tmp_path / "teacher" / "topk" / "meta.json").read_text())
    assert m["topk_positions"] == meta["tokens"] == card.tokens["loss_positions"]["train"]
    assert m["topk_bytes"] == meta["bytes"] > 0 and m["topk_positions_per_second"] > 0


def test_component_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    from llmneo_components.prep import prep_data

    with pytest.raises(SystemExit) as e:
        prep_data.python_func(preset="tiny", config="", overrides=[f"data.source={tmp_path / 'missing.jsonl'}"],
                              answers=given_answers(tmp_path, []), dataset=FakeArtifact(tmp_path / "d"), metrics=FakeArtifact(tmp_path / "m"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: data.source: ") and err.endswith("missing.jsonl' does not exist")
