"""Offline teacher top-k cache: its content equals the teacher's top-k log-softmax at exactly the loss
positions (padded batches, packed rows, padded teacher vocabulary), and KD from a k=vocab cache equals
the online KD of llmneo.losses.distill_loss."""


import pyarrow.parquet as pq
import pytest
import torch

from llmneo.cards import DatasetCard
from llmneo.config import TinyModelConfig, load_config
from llmneo.data import run_prep
from llmneo.losses import LossSpec, distill_loss, shift_mask
from llmneo.models import build_tiny_llama, build_tiny_tokenizer, load_causal_lm
from llmneo.teacher import run_teacher
from llmneo.topk import TopKCache

VOCAB = 512


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def offline(root, *overrides, data=()):
    cfg = load_config("tiny", ["teacher.mode=offline", "teacher.topk_batch_size=3", *overrides, *data])
    run_prep(cfg, build_tiny_tokenizer(), root / "dataset")
    card = run_teacher(cfg, root / "dataset", root / "teacher", root / "student")
    return card, TopKCache(root / "teacher" / "topk")


def train_rows(root):
    return pq.read_table(root / "dataset" / "train.parquet").to_pylist()


def reference_logprobs(teacher, row, vocab=VOCAB):
    """Full teacher log-softmax at the loss positions of one row, run alone (no padding): [n, vocab]."""
    ids = torch.tensor([row["input_ids"]])
    kwargs = {"position_ids": torch.tensor([row["position_ids"]])} if "position_ids" in row else {}
    with torch.no_grad():
        logits = teacher(input_ids=ids, use_cache=False, **kwargs).logits[0, :-1, :vocab].float()
    mask, _ = shift_mask(torch.tensor([row["labels"]]))
    return torch.log_softmax(logits[mask[0]], -1)


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    card, cache = offline(root, f"teacher.topk={VOCAB}")
    return root, card, cache


def test_full_cache_equals_teacher_log_softmax_at_the_loss_positions(full_cache):
    root, card, cache = full_cache
    teacher = load_causal_lm(root / "teacher").eval()
    rows = train_rows(root)
    assert len(cache) == len(rows) and cache.k == VOCAB
    for i, row in enumerate(rows):
        ids, lps = cache[i]
        ref = reference_logprobs(teacher, row)
        assert ids.shape == ref.shape
        dense = torch.full_like(ref, float("nan")).scatter_(1, ids, lps)  # k = vocab: a permutation
        torch.testing.assert_close(dense, ref, atol=4e-3, rtol=0)  # fp16 storage
        assert (lps[:, :-1] >= lps[:, 1:]).all()  # sorted by decreasing probability


def test_cache_meta_and_card(full_cache):
    root, card, cache = full_cache
    dataset = DatasetCard.read(root / "dataset")
    meta = cache.meta
    assert meta["rows"] == dataset.counts["train"] and meta["tokens"] == dataset.tokens["loss_positions"]["train"]
    assert meta["dataset_hash"] == dataset.dataset_hash and meta["vocab_size"] == VOCAB
    assert meta["tokenizer_fingerprint"] == dataset.tokenizer_fingerprint
    topk = card.teacher.topk
    assert topk["bytes"] == sum((root / "teacher" / "topk" / s["file"]).stat().st_size for s in meta["shards"])
    assert topk["positions_per_second"] > 0 and topk["rows"] == meta["rows"]


def test_small_k_holds_the_k_largest_log_probabilities(tmp_path):
    card, cache = offline(tmp_path, "teacher.topk=8", "teacher.topk_dtype=bfloat16", data=["data.limit=30"])
    teacher = load_causal_lm(tmp_path / "teacher").eval()
    for i, row in enumerate(train_rows(tmp_path)):
        ids, lps = cache[i]
        ref = reference_logprobs(teacher, row)
        assert ids.shape == (ref.shape[0], 8)
        torch.testing.assert_close(lps, ref.topk(8, -1).values, atol=3e-2, rtol=0)  # bf16 storage
        torch.testing.assert_close(ref.gather(1, ids), lps, atol=3e-2, rtol=0)  # the right tokens


def test_kd_from_a_full_cache_equals_online_kd(full_cache):
    """Reference formula on the cache: KD = Σ_t Σ_j p_j (log p_j − log q(ids_j)) over cached entries."""
    root, _, cache = full_cache
    teacher = load_causal_lm(root / "teacher").eval()
    rows = train_rows(root)[:6]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    student_logits = torch.randn(len(rows), width, VOCAB, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=attn).logits
    online = distill_loss(student_logits, labels, teacher_logits, LossSpec(alpha=0.5))

    mask, _ = shift_mask(labels)
    student_logp = torch.log_softmax(student_logits[:, :-1][mask].float(), -1)  # [N, V], row-major
    cached_ids, cached_lps = cache.rows(range(len(rows)))  # the same N positions, same order
    assert cached_ids.shape[0] == student_logp.shape[0] == online.tokens
    kd = (cached_lps.exp() * (cached_lps - student_logp.gather(1, cached_ids))).sum()
    torch.testing.assert_close(kd, online.kd, rtol=2e-3, atol=1e-3)


def test_packed_rows_give_the_same_cache_as_unpacked_rows(tmp_path):
    data = ["data.max_length=160", "data.limit=40"]
    _, plain = offline(tmp_path / "plain", "teacher.topk=16", data=data)
    _, packed = offline(tmp_path / "packed", "teacher.topk=16", data=[*data, "data.packing=true"])
    packs = train_rows(tmp_path / "packed")
    assert len(packed) == len(packs) < len(plain)
    assert sum(len(p["rows"]) for p in packs) == len(plain)
    plain_ids, plain_lps = plain.rows(range(len(plain)))
    packed_ids, packed_lps = packed.rows(range(len(packed)))
    assert torch.equal(plain_ids, packed_ids)
    torch.testing.assert_close(plain_lps, packed_lps, atol=2e-3, rtol=0)


def test_padded_teacher_vocabulary_is_sliced_in_the_cache(tmp_path, tok):
    teacher = build_tiny_llama(TinyModelConfig(num_layers=2, seed=4), VOCAB + 64, tok.pad_token_id)
    with torch.no_grad():  # make the padding columns the most likely ones, so slicing is visible
        teacher.lm_head.weight[VOCAB:] = teacher.lm_head.weight[:64] * 50
    teacher.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    card, cache = offline(tmp_path, f"teacher.source={tmp_path / 'padded'}", "teacher.topk=16",
                          data=["data.limit=20"])
    assert card.teacher.vocab_slice["student_vocab_size"] == VOCAB and cache.vocab_size == VOCAB
    teacher.eval()
    for i, row in enumerate(train_rows(tmp_path)[:5]):
        ids, lps = cache[i]
        assert int(ids.max()) < VOCAB
        ref = reference_logprobs(teacher, row, vocab=VOCAB)  # log-softmax over the first 512 logits
        torch.testing.assert_close(lps, ref.topk(16, -1).values, atol=4e-3, rtol=0)
