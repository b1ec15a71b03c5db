import torch

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
