"""Teacher-written answers (llmneo/generate.py): formats, multi-turn, reuse, resume after a kill, rejects."""

import json
import shutil

import pytest

from llmneo.cards import AnswersCard
from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.generate import Generation, TransformersGenerator, run_generate, work_root

REPO_DATA = __import__("pathlib").Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNEO_CACHE", str(tmp_path / "cache"))


class Scripted:
    """A deterministic engine behind the seam: answers "A(<last user turn>|<earlier answers>)";
    a prompt containing TRUNC is cut, EMPTY gets an empty answer. Counts the conversations it saw."""

    batch_size = 4

    def __init__(self, stop_after=None):
        self.seen, self.stop_after = [], stop_after

    def generate(self, conversations, seed):
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise KeyboardInterrupt  # a kill in the middle of a shard
        out = []
        for conv in conversations:
            self.seen.append(conv)
            last = conv[-1]["content"]
            earlier = ",".join(m["content"] for m in conv if m["role"] == "assistant")
            if "TRUNC" in last:
                out.append(Generation("cut", 7, False))
            elif "EMPTY" in last:
                out.append(Generation("", 1, True))
            else:
                out.append(Generation(f"A({last}|{earlier})", 5, True))
        return out


def write(tmp_path, rows, name="src.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(src, *over):
    return load_config("tiny", [f"data.source={src}", "data.answers=teacher", *over])


def answers(out):
    return [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]


def test_each_prompt_only_format_is_answered_and_mt_bench_turn_by_turn(tmp_path):
    rows = [{"question_id": 81, "category": "writing", "turns": ["Q1", "Q2"]},    # 1 MT-Bench, two turns
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "M"}]},  # 2
            {"instruction": "I", "input": "X"},                                      # 3
            {"prompt": "P"},                                                          # 4
            {"foo": 1}]                                                               # 5 unknown format
    gen = Scripted()
    card = run_generate(config(write(tmp_path, rows)), tmp_path / "out", lambda: gen)
    got = {r["row"]: r["messages"] for r in answers(tmp_path / "out")}
    assert got[1] == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A(Q1|)"},
                      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A(Q2|A(Q1|))"}]
    assert got[2] == [{"role": "system", "content": "S"}, {"role": "user", "content": "M"},
                      {"role": "assistant", "content": "A(M|)"}]
    assert got[3][-1] == {"role": "assistant", "content": "A(I\n\nX|)"}
    assert got[4][-1] == {"role": "assistant", "content": "A(P|)"}
    # the second MT-Bench turn saw the teacher's first answer
    assert gen.seen[-1][-2] == {"role": "assistant", "content": "A(Q1|)"}
    assert card.formats == {"turns": 1, "messages": 1, "alpaca": 1, "prompt": 1}
    assert card.counts == {"read": 5, "rejected": 1, "kept": 4, "answered": 4, "passed_through": 0}
    assert card.answers_generated == 5 and card.new_tokens == 25
    assert card.teacher["source"] == "tiny" and card.teacher["fingerprint"].startswith("tiny:")
    assert card.generation["max_new_tokens"] == 256 and card.generation["temperature"] == 0.0
    assert card.samples[0]["row"] == 1 and AnswersCard.read(tmp_path / "out").generation_key == card.generation_key


def test_answers_teacher_replaces_given_answers_and_missing_keeps_them(tmp_path):
    rows = [{"instruction": "Q", "output": "given"}, {"prompt": "P"}]
    src = write(tmp_path, rows)
    run_generate(config(src), tmp_path / "t", Scripted)
    assert [r["messages"][-1]["content"] for r in answers(tmp_path / "t")] == ["A(Q|)", "A(P|)"]
    card = run_generate(config(src, "data.answers=missing"), tmp_path / "m", Scripted)
    assert [r["messages"][-1]["content"] for r in answers(tmp_path / "m")] == ["given", "A(P|)"]
    assert card.counts["passed_through"] == 1 and card.counts["answered"] == 1


def test_truncated_and_empty_answers_are_rejected_with_reason_and_counted(tmp_path):
    rows = [{"turns": ["fine", "TRUNC later"]}, {"prompt": "EMPTY"}, {"prompt": "ok"}]
    card = run_generate(config(write(tmp_path, rows)), tmp_path / "out", Scripted)
    rej = {r["row"]: r for r in map(json.loads, (tmp_path / "out/rejects.jsonl").read_text().splitlines())}
    assert rej[1]["kind"] == "truncated" and "turn 2" in rej[1]["reason"] and "7 tokens" in rej[1]["reason"]
    assert rej[2] == {"row": 2, "reason": "empty answer from the teacher", "kind": "empty_answer"}
    assert card.rejected_by_kind == {"empty_answer": 1, "truncated": 1}
    assert [r["row"] for r in answers(tmp_path / "out")] == [3]


def test_a_second_run_reuses_the_answers_and_a_changed_parameter_regenerates(tmp_path):
    src = write(tmp_path, [{"prompt": f"P{i}"} for i in range(10)])
    first = run_generate(config(src, "generate.shard_prompts=4"), tmp_path / "a", Scripted)
    again = Scripted()
    second = run_generate(config(src, "generate.shard_prompts=4"), tmp_path / "b", lambda: again)
    assert again.seen == [] and second.shards == {"total": 3, "reused": 3, "generated": 0}
    assert (tmp_path / "a/answers.jsonl").read_bytes() == (tmp_path / "b/answers.jsonl").read_bytes()
    assert second.generation_key == first.generation_key
    changed = Scripted()
    third = run_generate(config(src, "generate.shard_prompts=4", "generate.max_new_tokens=99"), tmp_path / "c",
                         lambda: changed)
    assert third.generation_key != first.generation_key and len(changed.seen) == 10
    other_teacher = run_generate(config(src, "generate.shard_prompts=4", "teacher.tiny.seed=7"), tmp_path / "d",
                                 Scripted)
    assert other_teacher.generation_key != first.generation_key and other_teacher.shards["generated"] == 3


def test_a_killed_run_resumes_without_redoing_finished_shards(tmp_path):
    src = write(tmp_path, [{"prompt": f"P{i}"} for i in range(10)])
    cfg = config(src, "generate.shard_prompts=4")
    with pytest.raises(KeyboardInterrupt):  # killed in the second shard
        run_generate(cfg, tmp_path / "killed", lambda: Scripted(stop_after=4))
    assert not (tmp_path / "killed/card.json").exists()
    resumed = Scripted()
    card = run_generate(cfg, tmp_path / "killed", lambda: resumed)
    assert [c[-1]["content"] for c in resumed.seen] == [f"P{i}" for i in range(4, 10)]  # shard 0 not redone
    assert card.shards == {"total": 3, "reused": 1, "generated": 2}
    shutil.rmtree(work_root())  # an uninterrupted run from scratch gives the same bytes
    run_generate(cfg, tmp_path / "fresh", Scripted)
    assert (tmp_path / "killed/answers.jsonl").read_bytes() == (tmp_path / "fresh/answers.jsonl").read_bytes()


def test_a_tampered_shard_is_regenerated(tmp_path):
    src = write(tmp_path, [{"prompt": f"P{i}"} for i in range(3)])
    card = run_generate(config(src), tmp_path / "a", Scripted)
    shard = work_root() / card.generation_key / "shard-00000.jsonl"
    shard.write_text(shard.read_text().replace("A(P0|)", "planted"))
    again = Scripted()
    run_generate(config(src), tmp_path / "b", lambda: again)
    assert len(again.seen) == 3 and "planted" not in (tmp_path / "b/answers.jsonl").read_text()


def test_given_writes_only_a_card_and_all_rejected_is_one_line(tmp_path):
    card = run_generate(load_config("tiny"), tmp_path / "g")
    assert card.answers == "given" and not (tmp_path / "g/answers.jsonl").exists()
    with pytest.raises(UserError, match=r"all 1 rows rejected \(first: row 1: unknown format"):
        run_generate(config(write(tmp_path, [{"foo": 1}])), tmp_path / "x", Scripted)
    with pytest.raises(UserError, match="no record kept after generation.*truncated"):
        run_generate(config(write(tmp_path, [{"prompt": "TRUNC"}], "t.jsonl")), tmp_path / "y", Scripted)


def test_transformers_generator_matches_unbatched_greedy_generation():
    """The seam's transformers implementation: left-padded batches of mixed lengths give each prompt
    the answer that greedy generation of that prompt alone gives; stop tokens end a turn."""
    import torch

    from llmneo.models import CHATML_TEMPLATE, build_tiny_llama, build_tiny_tokenizer

    cfg = load_config("tiny", ["generate.max_new_tokens=6"])
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(cfg.teacher.tiny, len(tok), tok.pad_token_id).eval()
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Name three colors, please."}]]
    gen = TransformersGenerator(model, tok, CHATML_TEMPLATE, cfg.generate, batch_size=2)
    batched = gen.generate(convs, seed=0)
    for conv, got in zip(convs, batched, strict=True):
        ids = torch.tensor([gen.prompt_ids(conv)])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen.config)
        new = ref[0, ids.shape[1]:].tolist()
        assert got.new_tokens == len(new) == 6 and not got.finished  # random weights: cut at max_new_tokens
        assert got.text == tok.decode(new, skip_special_tokens=True).strip()
    # the third greedy token as a stop token: that turn ends there, finished
    first = gen.generate(convs[:1], seed=0)[0]
    ids = torch.tensor([gen.prompt_ids(convs[0])])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen.config)[0, ids.shape[1]:]
    stop = int(ref[2])
    k = ref.tolist().index(stop)
    stopped = TransformersGenerator(model, tok, CHATML_TEMPLATE, cfg.generate, 2, stop_token_ids=[stop])
    g = stopped.generate(convs[:1], seed=0)[0]
    assert g.finished and g.new_tokens == k + 1 and g.text == tok.decode(ref[:k].tolist(), skip_special_tokens=True).strip()
    assert first.new_tokens == 6


def test_prep_reads_the_teacher_answers_and_records_the_generation(tmp_path):
    """generate → prep (the pipeline's order): prep tokenizes the answered conversations, its card keeps
    data.source and records the teacher and parameters; prep without the answers says what to run."""
    from llmneo.cards import DatasetCard
    from llmneo.data import read_split
    from llmneo.steps import prepare_dataset

    src = REPO_DATA / "mt_bench_small.jsonl"
    cfg = config(src, "data.min_rows=1")
    answers = run_generate(cfg, tmp_path / "answers", Scripted)
    card = prepare_dataset(cfg, tmp_path / "dataset", tmp_path / "answers")
    assert card.source == str(src) and card.counts["kept"] == 12 and card.formats == {"messages": 12}
    generated = card.source_info["generated"]
    assert generated["generation_key"] == answers.generation_key and generated["teacher"] == answers.teacher
    assert len(read_split(tmp_path / "dataset", "train")) + len(read_split(tmp_path / "dataset", "val")) == 12
    assert DatasetCard.read(tmp_path / "dataset").dataset_hash == card.dataset_hash
    with pytest.raises(UserError, match="run `llmneo generate --out DIR`"):
        prepare_dataset(cfg, tmp_path / "d2")
    with pytest.raises(UserError, match="not of this configuration"):
        prepare_dataset(config(src, "data.answers=missing"), tmp_path / "d3", tmp_path / "answers")
