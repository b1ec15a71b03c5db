import pytest
import torch

from llmneo import topk
from llmneo.topk import TopKCache, TopKWriter


def test_round_trip_across_shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = []
    writer = TopKWriter(tmp_path / "topk", k=4, vocab_size=50, dtype="float16", shard_tokens=7,
                        extra={"dataset_hash": "abc"})
    for n in (3, 0, 5, 9, 2):
        ids = torch.randint(0, 50, (n, 4), generator=g)
        lps = torch.log_softmax(torch.randn(n, 4, generator=g), -1)
        rows.append((ids, lps))
        writer.add(ids, lps)
    meta = writer.close()
    assert meta["rows"] == 5 and meta["tokens"] == 19 and len(meta["shards"]) >= 2
    assert meta["dataset_hash"] == "abc"
    cache = TopKCache(tmp_path / "topk")
    assert len(cache) == 5
    for r, (ids, lps) in enumerate(rows):
        got_ids, got_lps = cache[r]
        assert torch.equal(got_ids, ids)
        assert torch.allclose(got_lps, lps.half().float())


def test_shuffled_reads_across_more_shards_than_stay_open(tmp_path, monkeypatch):
    """Random row order over many small shards (a shuffled epoch): every row reads back exactly, with
    at most OPEN_SHARDS shard files open; rows outside the cache raise IndexError."""
    monkeypatch.setattr(topk, "OPEN_SHARDS", 2)
    g = torch.Generator().manual_seed(1)
    writer = TopKWriter(tmp_path / "topk", k=3, vocab_size=20, dtype="float16", shard_tokens=4)
    rows = []
    for r in range(30):
        n = r % 4 + 1
        ids, lps = torch.randint(0, 20, (n, 3), generator=g), -torch.rand(n, 3, generator=g)
        rows.append((ids, lps.half().float()))
        writer.add(ids, lps)
    assert len(writer.close()["shards"]) >= 10
    cache = TopKCache(tmp_path / "topk")
    order = torch.randperm(30, generator=g).tolist()
    for r in order + order[::-1]:
        ids, lps = cache[r]
        assert torch.equal(ids, rows[r][0]) and torch.equal(lps, rows[r][1])
        assert len(cache._open) <= 2
    got_ids, got_lps = cache.rows(order[:5])
    assert torch.equal(got_ids, torch.cat([rows[r][0] for r in order[:5]]))
    for bad in (-1, 30):
        with pytest.raises(IndexError):
            cache[bad]
