"""Data prep: formats, labels, bad records, determinism, split, limit, packing, card (tiny tokenizer)."""

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from llmneo.cards import DatasetCard
from llmneo.config import load_config
from llmneo.data import (
    IGNORE_INDEX,
    PROMPT_ONLY_HINT,
    ChatRenderer,
    encode_batch,
    resolve_chat_template,
    run_prep,
    to_conversation,
    to_messages,
)
from llmneo.data_sources import RecordError
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


def prep(tmp_path, tok, rows, *overrides, name="out"):
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows) if rows is not None else None
    over = ([f"data.source={src}"] if src else []) + ["data.min_rows=1", *overrides]
    card = run_prep(load_config("tiny", over), tok, tmp_path / name)
    return card, tmp_path / name


def parquet_rows(path):
    return pq.read_table(path).to_pylist()


def rejects(out):
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]


def qa(i, answer_words=3):
    return {"instruction": f"Question number {i}?", "output": " ".join(["answer"] * answer_words) + f" {i}."}


# ---------------------------------------------------------------------------- formats


def test_each_format_normalizes_to_the_same_conversation():
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}
    messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add\n\n2 and 3"},
                             {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]}
    sharegpt = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Add\n\n2 and 3"},
                                                          {"from": "gpt", "value": "5"}]}
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add\n\n2 and 3"},
                {"role": "assistant", "content": "5"}]
    assert to_messages(alpaca, "alpaca") == expected
    assert to_messages(messages, "messages") == expected
    assert to_messages(sharegpt, "sharegpt") == expected
    assert to_messages({"text": "just text"}, "text") == "just text"


def test_alpaca_seed_tasks_with_instances_are_accepted(tmp_path, tok):
    """Alpaca's seed_tasks.jsonl form: instruction + instances [{input, output}] (several instances:
    one exchange each, the same instruction applied to every input)."""
    seed = {"id": "seed_task_0", "name": "breakfast_suggestion", "instruction": "Is there anything I can eat?",
            "instances": [{"input": "", "output": "Yes, oatmeal."}], "is_classification": False}
    assert to_messages(seed, "alpaca") == [{"role": "user", "content": "Is there anything I can eat?"},
                                           {"role": "assistant", "content": "Yes, oatmeal."}]
    two = {"instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]}
    assert to_messages(two, "alpaca") == [{"role": "user", "content": "Add.\n\n1 2"}, {"role": "assistant", "content": "3"},
                                          {"role": "user", "content": "Add.\n\n2 2"}, {"role": "assistant", "content": "4"}]
    rows = [dict(seed, id=f"seed_task_{i}", instruction=f"Task {i}?") for i in range(175)]
    card, _ = prep(tmp_path, tok, rows)
    assert card.counts["kept"] == 175 and card.formats == {"alpaca": 175}
    with pytest.raises(RecordError, match="'instances' must be a non-empty list"):
        to_messages({"instruction": "x", "instances": []}, "alpaca")


def test_prompt_only_formats_become_placeholders_and_are_refused_with_a_hint():
    """turns (MT-Bench), prompt, instruction without output, messages ending on a user turn: each
    answer the record lacks is a placeholder; given answers are kept (prompt/completion)."""
    hole = {"role": "assistant", "content": None}
    mt_bench = {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]}
    assert to_conversation(mt_bench, "turns") == [{"role": "user", "content": "Write a haiku."}, hole,
                                                  {"role": "user", "content": "Now make it rhyme."}, hole]
    assert to_conversation({"prompt": "Hi?"}, "prompt") == [{"role": "user", "content": "Hi?"}, hole]
    assert to_messages({"prompt": "Hi?", "completion": "Hello."}, "prompt") == [
        {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert to_conversation({"instruction": "Name a color.", "system": "Be brief."}, "alpaca") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}, hole]
    assert to_conversation({"messages": [{"role": "user", "content": "q"}]}, "messages") == [
        {"role": "user", "content": "q"}, hole]
    for rec, fmt in ((mt_bench, "turns"), ({"prompt": "Hi?"}, "prompt"), ({"instruction": "Name one."}, "alpaca")):
        with pytest.raises(RecordError, match="data.answers=teacher") as e:
            to_messages(rec, fmt)
        assert e.value.kind == "prompt_only"
    # a trailing question after given answers stays context (as before), not a prompt-only record
    assert to_messages({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                     {"role": "user", "content": "q2"}]}, "messages")[-1]["content"] == "q2"
    with pytest.raises(RecordError, match=r"turns\[1\] must be a string"):
        to_conversation({"turns": ["a", 3]}, "turns")
    with pytest.raises(RecordError, match="empty field turns"):
        to_conversation({"turns": ["a", " "]}, "turns")


def test_prompt_only_data_fails_prep_naming_what_is_missing(tmp_path, tok):
    rows = [{"question_id": i, "category": "x", "turns": [f"Question {i}?"]} for i in range(5)]
    with pytest.raises(UserError, match=r"all 5 rows rejected \(first: row 1: record has no answers.*"
                                        r"data.answers=teacher"):
        prep(tmp_path, tok, rows)


def test_auto_detection_counts_formats_and_override_rejects_other_formats(tmp_path, tok):
    rows = [{"instruction": "a?", "output": "b"},
            {"messages": [{"role": "user", "content": "c?"}, {"role": "assistant", "content": "d"}]},
            {"conversations": [{"from": "human", "value": "e?"}, {"from": "gpt", "value": "f"}]},
            {"text": "plain text row"},
            {"conversations": [{"from": "human", "value": "g?"}, {"from": "gpt", "value": "h"}]}]
    card, _ = prep(tmp_path, tok, rows, name="auto")
    assert card.formats == {"alpaca": 1, "messages": 1, "sharegpt": 2, "text": 1}
    card, out = prep(tmp_path, tok, rows, "data.format=sharegpt", name="forced")
    assert card.formats == {"sharegpt": 2} and card.counts["kept"] == 2
    assert {r["row"]: r["reason"] for r in rejects(out)} == {
        1: "missing field 'conversations'", 2: "missing field 'conversations'", 4: "missing field 'conversations'"}


def reference_encode(tokenizer, messages):
    """The straightforward definition: tokenize every assistant turn's prompt prefix separately."""
    ids, labels = [], []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True,
                                               return_dict=False)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False)
        assert full[: len(prefix)] == prefix
        labels += [IGNORE_INDEX] * (len(prefix) - len(ids)) + full[len(prefix):]
        ids = full
    return ids, labels


def test_labels_equal_per_turn_prefix_tokenization(tok):
    convs = [
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
         {"role": "assistant", "content": " six, with a leading space"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\nstarts with newlines"}],
    ]
    dcfg = load_config("tiny", ["data.max_length=512"]).data
    got = encode_batch(tok, convs, dcfg, ChatRenderer(tok, resolve_chat_template(tok, dcfg)))
    for conv, (ids, labels, truncated) in zip(convs, got, strict=True):
        assert (ids, labels) == reference_encode(tok, conv)
        assert not truncated
    # the second conversation trains on both answers, each ending with <|im_end|>
    ids, labels, _ = got[1]
    text = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert text.count("<|im_end|>") == 2 and "4" in text and "six" in text and "2+2" not in text


def test_all_token_labels_when_configured(tmp_path, tok):
    card, out = prep(tmp_path, tok, [qa(i) for i in range(6)], "data.assistant_only_labels=false")
    for r in parquet_rows(out / "train.parquet") + parquet_rows(out / "val.parquet"):
        assert r["labels"] == r["input_ids"]


def test_builtin_prep_labels_only_on_response(tmp_path, tok):
    card = run_prep(load_config("tiny"), tok, tmp_path)
    assert card.counts["rejected"] == 0 and card.counts["kept"] == card.counts["read"]
    rows = parquet_rows(tmp_path / "train.parquet")
    assert len(rows) == card.counts["train"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for r in rows:
        labelled = [i for i, t in enumerate(r["labels"]) if t != IGNORE_INDEX]
        assert labelled, "every kept row has response tokens"
        assert all(r["labels"][i] == r["input_ids"][i] for i in labelled)
        assert r["input_ids"][0] == im_start and r["labels"][0] == IGNORE_INDEX
        text = tok.decode([r["input_ids"][i] for i in labelled])
        assert "<|im_end|>" in text and "user" not in text


def test_text_format_ends_with_eos_and_trains_on_everything(tmp_path, tok):
    card, out = prep(tmp_path, tok, [{"text": f"plain text number {i}"} for i in range(4)])
    for r in parquet_rows(out / "train.parquet"):
        assert r["input_ids"][-1] == tok.eos_token_id and r["labels"] == r["input_ids"]


def test_chat_template_override(tmp_path, tok):
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    card, out = prep(tmp_path, tok, [qa(i) for i in range(4)], f"data.chat_template={json.dumps(template)}")
    r = parquet_rows(out / "train.parquet")[0]
    assert tok.decode(r["input_ids"]).startswith("user: Question number")
    assert tok.decode([t for t in r["labels"] if t != IGNORE_INDEX]).startswith("answer answer")


# ---------------------------------------------------------------------------- bad records


def test_each_kind_of_bad_record_goes_to_rejects_with_row_and_reason(tmp_path, tok):
    rows = [
        qa(1),                                                            # 1 kept
        b"{not json\n",                                                   # 2
        {"instruction": "Say hi", "output": ""},                          # 3
        {"instruction": 3, "output": "x"},                                # 4
        b"\xff\xfe\n",                                                    # 5
        {"messages": [{"role": "user", "content": "q"}]},                 # 6
        qa(1),                                                            # 7 duplicate of 1
        b"[1, 2]\n",                                                      # 8
        {"foo": "bar"},                                                   # 9
        {"conversations": [{"from": "wizard", "value": "x"}]},            # 10
        {"messages": "not a list"},                                       # 11
        {"instruction": "fine", "output": None},                          # 12
        b"\n",                                                            # 13 blank: skipped, not a record
        {"instruction": "long " * 100, "output": "y"},                    # 14 too long (drop)
        {"text": "   "},                                                  # 15
        qa(2), qa(3), qa(4),                                              # 16-18 kept
    ]
    card, out = prep(tmp_path, tok, rows, "data.truncation=drop", "data.max_length=64")
    by_row = {r["row"]: (r["kind"], r["reason"]) for r in rejects(out)}
    assert by_row[2][0] == "invalid_json" and by_row[2][1].startswith("invalid JSON")
    assert by_row[3] == ("empty", "empty response")
    assert by_row[4] == ("wrong_type", "field 'instruction' must be a string, got int")
    assert by_row[5][0] == "undecodable" and by_row[5][1].startswith("undecodable bytes")
    # prompt-only records say what is missing and how to supply it
    assert by_row[6] == ("prompt_only", f"record {PROMPT_ONLY_HINT}")
    assert by_row[7] == ("duplicate", "exact duplicate of row 1")
    assert by_row[8] == ("not_object", "record is a JSON list, expected an object")
    assert by_row[9][0] == "unknown_format"
    assert by_row[10] == ("unknown_role", "conversations[0].from: unknown role 'wizard'")
    assert by_row[11] == ("wrong_type", "field 'messages' must be a non-empty list")
    assert by_row[12] == ("prompt_only", f"record {PROMPT_ONLY_HINT}")
    assert by_row[14][0] == "too_long" and "data.max_length=64" in by_row[14][1]
    assert by_row[15] == ("empty", "empty field 'text'")
    assert 13 not in by_row and 1 not in by_row
    assert card.counts == {"read": 17, "rejected": 13, "kept": 4, "train": 3, "val": 1, "beyond_limit": 0}
    assert sum(card.rejected_by_kind.values()) == 13 and card.rejected_by_kind["wrong_type"] == 2
    kept_rows = {r["row"] for r in parquet_rows(out / "train.parquet") + parquet_rows(out / "val.parquet")}
    assert kept_rows == {1, 16, 17, 18}


def test_truncate_policy_keeps_the_head_and_counts_it(tmp_path, tok):
    long = {"instruction": "short?", "output": "word " * 80}
    card, out = prep(tmp_path, tok, [long, qa(1), qa(2), qa(3)], "data.max_length=64")
    rows = {r["row"]: r for r in parquet_rows(out / "train.parquet") + parquet_rows(out / "val.parquet")}
    full, full_labels = reference_encode(tok, to_messages(long, "alpaca"))
    assert len(full) > 64 and card.tokens["truncated"] == 1 and card.counts["kept"] == 4
    assert rows[1]["input_ids"] == full[:64] and rows[1]["labels"] == full_labels[:64]


def test_truncation_that_leaves_no_response_is_rejected(tmp_path, tok):
    card, out = prep(tmp_path, tok, [{"instruction": "long prompt " * 40, "output": "y"}, qa(1), qa(2)],
                     "data.max_length=64")
    assert rejects(out) == [{"row": 1, "reason": "no response tokens left after truncation", "kind": "no_labels"}]


def test_all_rejected_is_a_clear_error(tmp_path, tok):
    with pytest.raises(UserError, match=r"all 2 rows rejected \(first: row 1: invalid JSON"):
        prep(tmp_path, tok, [b"nope\n", {"foo": 1}])
    assert len(rejects(tmp_path / "out")) == 2  # kept for the user to inspect
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_all_rejected_at_tokenization_is_a_clear_error(tmp_path, tok):
    long = [{"instruction": f"long prompt {i} " * 40, "output": "y"} for i in range(3)]
    with pytest.raises(UserError, match=r"all 3 rows rejected \(first: row \d: too long: \d+ tokens > "
                                        r"data.max_length=64"):
        prep(tmp_path, tok, long, "data.max_length=64", "data.truncation=drop")


def test_fewer_than_min_rows_is_a_clear_error(tmp_path, tok):
    with pytest.raises(UserError, match=r"only 2 valid rows, data.min_rows=5 \(1 rejected"):
        prep(tmp_path, tok, [qa(1), qa(2), qa(1)], "data.min_rows=5")
    out = tmp_path / "out"
    assert not (out / "train.parquet").exists() and not list(out.glob(".*.part"))


def test_a_single_row_cannot_make_two_splits(tmp_path, tok):
    with pytest.raises(UserError, match="all 1 valid rows went to val"):
        prep(tmp_path, tok, [qa(1)])


def test_empty_source_is_a_clear_error(tmp_path, tok):
    with pytest.raises(UserError, match="no records"):
        prep(tmp_path, tok, [b"\n"])


# ---------------------------------------------------------------------------- order, split, limit


def test_outputs_are_deterministic_and_independent_of_the_memory_buffer(tmp_path, tok):
    rows = [qa(i, answer_words=1 + i % 7) for i in range(300)] + [qa(5, 6)] * 3
    _, a = prep(tmp_path, tok, rows, name="a")
    _, b = prep(tmp_path, tok, rows, name="b")
    # a 2 KB buffer spills ~50 sorted runs to disk and merges them: same bytes out
    _, c = prep(tmp_path, tok, rows, "data.buffer_mb=0.002", name="c")
    for split in ("train.parquet", "val.parquet", "rejects.jsonl"):
        assert (a / split).read_bytes() == (b / split).read_bytes() == (c / split).read_bytes(), split
    assert not (c / ".prep-runs").exists()
    card_a, card_c = (DatasetCard.read(d) for d in (a, c))
    assert card_a.dataset_hash == card_c.dataset_hash
    _, d = prep(tmp_path, tok, rows, "data.seed=5", name="d")
    order = lambda out: [r["row"] for r in parquet_rows(out / "train.parquet")]  # noqa: E731
    assert order(a) != order(d) and sorted(order(a) + [r["row"] for r in parquet_rows(a / "val.parquet")]) == \
        sorted(order(d) + [r["row"] for r in parquet_rows(d / "val.parquet")])
    assert [r["row"] for r in rejects(a)] == [r["row"] for r in rejects(c)]


def test_shuffle_is_a_real_permutation_not_the_source_order(tmp_path, tok):
    card, out = prep(tmp_path, tok, [qa(i) for i in range(200)])
    rows = [r["row"] for r in parquet_rows(out / "train.parquet")]
    assert sorted(rows) != rows
    # rank correlation with the source order is small for a uniform shuffle (|rho| < 0.3, fixed seed)
    n = len(rows)
    ranks = sorted(range(n), key=lambda i: rows[i])
    rho = 1 - 6 * sum((i - r) ** 2 for i, r in enumerate(ranks)) / (n * (n * n - 1))
    assert abs(rho) < 0.3


def test_val_split_size_is_ceil_n_times_fraction(tmp_path, tok):
    for n, fraction in ((7, 0.1), (50, 0.1), (37, 0.25)):
        card, out = prep(tmp_path, tok, [qa(i) for i in range(n)], f"data.val_fraction={fraction}", name=f"n{n}")
        assert card.counts["val"] == math.ceil(n * fraction)
        assert card.counts["train"] == n - math.ceil(n * fraction)
        train = {r["row"] for r in parquet_rows(out / "train.parquet")}
        val = {r["row"] for r in parquet_rows(out / "val.parquet")}
        assert not train & val and len(train | val) == n


def test_limit_takes_nested_uniform_subsets(tmp_path, tok):
    rows = [qa(i) for i in range(120)]
    kept = {}
    for limit in (10, 40):
        card, out = prep(tmp_path, tok, rows, f"data.limit={limit}", name=f"l{limit}")
        assert card.counts["kept"] == limit and card.counts["beyond_limit"] == 120 - limit
        kept[limit] = {r["row"] for split in ("train", "val") for r in parquet_rows(out / f"{split}.parquet")}
    assert kept[10] < kept[40]
    assert max(kept[10]) > 40  # not the head of the file


def test_limit_counts_rows_kept_after_rejects(tmp_path, tok):
    rows = [qa(i) for i in range(30)] + [qa(0)] * 30  # 30 duplicates of row 1
    card, out = prep(tmp_path, tok, rows, "data.limit=25")
    assert card.counts["kept"] == 25


# ---------------------------------------------------------------------------- card


def test_card_statistics_match_the_parquet_files(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", [qa(i, answer_words=i % 9 + 1) for i in range(40)])
    card = run_prep(load_config("tiny", [f"data.source={src}"]), tok, tmp_path / "out")
    out = tmp_path / "out"
    rows = parquet_rows(out / "train.parquet") + parquet_rows(out / "val.parquet")
    lengths = sorted(len(r["input_ids"]) for r in rows)
    t = card.tokens
    assert t["total"] == sum(lengths) and t["min_length"] == lengths[0] and t["max_length"] == lengths[-1]
    assert t["p50_length"] == lengths[math.ceil(0.5 * len(lengths)) - 1]
    assert t["label_tokens"] == sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    train = parquet_rows(out / "train.parquet")
    assert t["loss_positions"]["train"] == sum(sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in train)
    import hashlib

    assert card.content_hash == hashlib.sha256(src.read_bytes()).hexdigest()
    assert card.source == str(src) and len(card.dataset_hash) == 16
    assert (out / "length_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert card.tokenizer_fingerprint and card.rows_per_second > 0


# ---------------------------------------------------------------------------- packing


def test_packing_keeps_every_example_with_boundaries(tmp_path, tok):
    rows = [qa(i, answer_words=1 + i % 5) for i in range(40)]
    card_u, plain = prep(tmp_path, tok, rows, "data.max_length=96", name="plain")
    card_p, packed = prep(tmp_path, tok, rows, "data.max_length=96", "data.packing=true", name="packed")
    assert (plain / "val.parquet").read_bytes() == (packed / "val.parquet").read_bytes()  # val never packed
    examples = parquet_rows(plain / "train.parquet")
    packs = parquet_rows(packed / "train.parquet")
    assert len(packs) < len(examples) and card_p.packing["train_examples"] == len(examples)
    assert card_p.counts["train"] == len(packs)
    unpacked = []
    for p in packs:
        assert len(p["input_ids"]) <= 96 and p["row"] == p["rows"][0]
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert len(starts) == len(p["rows"])
        for s, e in zip(starts, starts[1:] + [len(p["input_ids"])], strict=True):
            assert p["position_ids"][s:e] == list(range(e - s))
            assert p["labels"][s] == IGNORE_INDEX  # no position predicts across a boundary
            unpacked.append((p["input_ids"][s:e], p["labels"][s:e]))
    assert unpacked == [(r["input_ids"], r["labels"]) for r in examples]  # same examples, same order


def test_packed_forward_equals_separate_forwards(tmp_path, tok):
    """The trainer contract: position_ids + no attention mask + use_cache=False keeps attention inside
    each example (transformers' packed-sequence mask), so per-token logits equal unpacked ones."""
    from llmneo.config import TinyModelConfig
    from llmneo.models import build_tiny_llama

    rows = [qa(i, answer_words=2 + i % 4) for i in range(12)]
    _, plain = prep(tmp_path, tok, rows, "data.max_length=128", name="plain")
    _, packed = prep(tmp_path, tok, rows, "data.max_length=128", "data.packing=true", name="packed")
    model = build_tiny_llama(TinyModelConfig(), len(tok)).eval()
    pack = parquet_rows(packed / "train.parquet")[0]
    assert len(pack["rows"]) > 1
    by_row = {r["row"]: r for r in parquet_rows(plain / "train.parquet")}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([pack["input_ids"]]),
                       position_ids=torch.tensor([pack["position_ids"]]), use_cache=False).logits[0]
        separate = torch.cat([model(input_ids=torch.tensor([by_row[r]["input_ids"]])).logits[0]
                              for r in pack["rows"]])
    torch.testing.assert_close(logits, separate, atol=1e-5, rtol=1e-4)


def test_record_error_kind_default():
    assert RecordError("x").kind == "invalid"


# ---------------------------------------------------------------------------- the external shuffle


@pytest.mark.parametrize("buffer_bytes, fanin", [(1 << 30, 16), (4000, 16), (4000, 3)])
def test_external_shuffle_order_is_independent_of_buffer_and_fanin(tmp_path, monkeypatch, buffer_bytes, fanin):
    import random

    from llmneo import data_shuffle

    monkeypatch.setattr(data_shuffle, "MAX_FANIN", fanin)
    rng = random.Random(1)
    blobs = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))) for _ in range(600)]
    blobs += blobs[:50]  # duplicates: they must come out next to their first occurrence
    shuffle = data_shuffle.ExternalShuffle(tmp_path / "runs", seed=7, buffer_bytes=buffer_bytes)
    for row, blob in enumerate(blobs, start=1):
        shuffle.add(row, blob, where=f"f:{row}")
    got = list(shuffle)
    expected = sorted(
        (int.from_bytes(data_shuffle.hashlib.blake2b(data_shuffle.record_digest(b), digest_size=8,
                                                     key=(7).to_bytes(16, "big", signed=True)).digest(), "big"), r)
        for r, b in enumerate(blobs, start=1))
    assert [(k, r) for k, r, *_ in got] == expected
    assert all(blob == blobs[row - 1] and where == f"f:{row}" for _, row, _, where, blob in got)
    if buffer_bytes < 1 << 20:
        assert len(list((tmp_path / "runs").glob("run-*.parquet"))) <= fanin  # merged down to the fan-in
    for i, (_, row, digest, _, _) in enumerate(got):
        if row > 600:  # a duplicate directly follows its original (same key, higher row)
            assert got[i - 1][1] == row - 600 and got[i - 1][2] == digest
    shuffle.cleanup()
    assert not (tmp_path / "runs").exists()
