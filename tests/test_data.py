import json

import pyarrow.parquet as pq
import pytest

from llmneo.config import load_config
from llmneo.data import IGNORE_INDEX, run_prep
from llmneo.errors import UserError
from llmneo.models import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


def test_builtin_prep_labels_only_on_response(tmp_path, tok):
    cfg = load_config("tiny")
    card = run_prep(cfg, tok, tmp_path)
    assert card["counts"]["rejected"] == 0 and card["counts"]["kept"] == card["counts"]["read"]
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert len(rows) == card["counts"]["train"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for r in rows:
        labelled = [i for i, t in enumerate(r["labels"]) if t != IGNORE_INDEX]
        assert labelled, "every kept row has response tokens"
        # labels equal the ids where set, and the prompt (starting with <|im_start|>) is masked
        assert all(r["labels"][i] == r["input_ids"][i] for i in labelled)
        assert r["input_ids"][0] == im_start and r["labels"][0] == IGNORE_INDEX
        # the response is the tail of the conversation and ends with <|im_end|>\n
        text = tok.decode([r["input_ids"][i] for i in labelled])
        assert "<|im_end|>" in text and "user" not in text


def test_bad_rows_go_to_rejects_with_reasons(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"instruction": "Say hi", "output": "hi"},
        b"{not json\n",
        {"instruction": "Say hi", "output": ""},
        {"instruction": 3, "output": "x"},
        b"\xff\xfe\n",
        {"messages": [{"role": "user", "content": "q"}]},
        {"instruction": "Say hi", "output": "hi"},
        {"text": "plain text works too"},
        {"instruction": "Count", "output": "one two three"},
    ])
    cfg = load_config("tiny", [f"data.source={src}", "data.min_rows=1"])
    card = run_prep(cfg, tok, tmp_path / "out")
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    by_row = {r["row"]: r["reason"] for r in rejects}
    assert by_row[2].startswith("invalid JSON")
    assert by_row[3] == "empty response"
    assert by_row[4] == "field 'instruction' must be a string, got int"
    assert by_row[5].startswith("undecodable bytes")
    assert by_row[6] == "no assistant turn"
    assert by_row[7] == "exact duplicate of an earlier record"
    assert card["counts"] == {"read": 9, "kept": 3, "rejected": 6, "train": 2, "val": 1}


def test_all_rejected_is_a_clear_error(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", [b"nope\n", {"foo": 1}])
    cfg = load_config("tiny", [f"data.source={src}"])
    with pytest.raises(UserError, match=r"all 2 rows rejected \(first: row 1: invalid JSON"):
        run_prep(cfg, tok, tmp_path / "out")


def test_drop_policy_rejects_long_rows(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "x " * 200, "output": "y"},
                                              {"instruction": "a", "output": "b"},
                                              {"instruction": "c", "output": "d"}])
    cfg = load_config("tiny", [f"data.source={src}", "data.truncation=drop", "data.max_length=32",
                               "data.min_rows=1"])
    run_prep(cfg, tok, tmp_path / "out")
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert '"row": 1' in rejects and "too long" in rejects


def test_split_is_deterministic(tmp_path, tok):
    cfg = load_config("tiny")
    run_prep(cfg, tok, tmp_path / "a")
    run_prep(cfg, tok, tmp_path / "b")
    assert (tmp_path / "a" / "val.parquet").read_bytes() == (tmp_path / "b" / "val.parquet").read_bytes()
    other = load_config("tiny", ["data.seed=5"])
    run_prep(other, tok, tmp_path / "c")
    rows = lambda d: [r["row"] for r in pq.read_table(d / "val.parquet").to_pylist()]  # noqa: E731
    assert rows(tmp_path / "a") != rows(tmp_path / "c")
