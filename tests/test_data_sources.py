"""Data prep sources: JSONL / JSON / Parquet files and folders, datasets saved to disk or cached from
the hub (offline), S3 (real SeaweedFS). The same records through any source give the same splits."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmneo import data_sources
from llmneo.config import load_config
from llmneo.data import PROMPT_ONLY_HINT, run_prep
from llmneo.errors import UserError
from llmneo.models import build_tiny_tokenizer

RECORDS = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def prep(tok, source, out, *overrides):
    return run_prep(load_config("tiny", [f"data.source={source}", "data.min_rows=1", *overrides]), tok, out)


def splits(out):
    return (out / "train.parquet").read_bytes(), (out / "val.parquet").read_bytes()


def rejects(out):
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok):
    """The splits prepared from a plain JSONL file: every other source must give the same bytes."""
    root = tmp_path_factory.mktemp("ref")
    card = prep(tok, write_jsonl(root / "data.jsonl", RECORDS), root / "out")
    return card, splits(root / "out")


def test_json_array_file(tmp_path, tok, reference, monkeypatch):
    monkeypatch.setattr(data_sources, "READ_CHUNK", 7)  # elements cut by chunk boundaries everywhere
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS, indent=1))
    card = prep(tok, path, tmp_path / "out")
    assert splits(tmp_path / "out") == reference[1]
    assert card.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_json_array_with_a_non_object_element_rejects_that_row(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS[:3] + ["oops"] + RECORDS[3:6]))
    card = prep(tok, path, tmp_path / "out")
    assert rejects(tmp_path / "out") == [
        {"row": 4, "reason": "record is a JSON str, expected an object", "kind": "not_object"}]
    assert card.counts["kept"] == 6


def test_broken_json_array_fails_with_position(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS[:3])[:-30] + "}, {]")
    with pytest.raises(UserError, match=r"data.json: invalid JSON .* after record 2"):
        prep(tok, path, tmp_path / "out")


def test_json_file_holding_json_lines(tmp_path, tok, reference):
    prep(tok, write_jsonl(tmp_path / "data.json", RECORDS), tmp_path / "out")
    assert splits(tmp_path / "out") == reference[1]


def test_parquet_file_with_nulls_and_wrong_types(tmp_path, tok, reference):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "data.parquet", row_group_size=5)
    card = prep(tok, tmp_path / "data.parquet", tmp_path / "out")
    assert splits(tmp_path / "out") == reference[1]
    assert card.content_hash == hashlib.sha256((tmp_path / "data.parquet").read_bytes()).hexdigest()
    bad = RECORDS[:4] + [{"instruction": "q", "input": "", "output": None}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    prep(tok, tmp_path / "bad.parquet", tmp_path / "out2")
    # a null answer makes the row prompt-only: rejected with the way to have the teacher answer it
    assert rejects(tmp_path / "out2") == [{"row": 5, "reason": "record " + PROMPT_ONLY_HINT, "kind": "prompt_only"}]


def test_corrupt_parquet_is_a_clear_error(tmp_path, tok):
    (tmp_path / "data.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="data.parquet: not a readable Parquet file"):
        prep(tok, tmp_path / "data.parquet", tmp_path / "out")


def test_folder_of_mixed_files_numbers_rows_across_files(tmp_path, tok, reference):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", RECORDS[:4])
    (folder / "b.json").write_text(json.dumps(RECORDS[4:8]))
    pq.write_table(pa.Table.from_pylist(RECORDS[8:]), folder / "sub" / "c.parquet")
    (folder / ".hidden.jsonl").write_text("not json\n")
    (folder / "notes.txt").write_text("ignored")
    card = prep(tok, folder, tmp_path / "out")
    assert splits(tmp_path / "out") == reference[1]  # same rows, same numbering → same bytes
    manifest = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}\n"
                       for p in (folder / "a.jsonl", folder / "b.json", folder / "sub" / "c.parquet"))
    assert card.content_hash == hashlib.sha256(manifest.encode()).hexdigest()
    # a bad record names its file and its row in that file
    (folder / "b.json").write_text(json.dumps(RECORDS[4:6] + [{"instruction": "x"}] + RECORDS[6:8]))
    prep(tok, folder, tmp_path / "out2")
    assert rejects(tmp_path / "out2") == [{"row": 7, "reason": "record " + PROMPT_ONLY_HINT, "kind": "prompt_only",
                                           "where": "b.json:3"}]


def test_missing_path_unsupported_file_and_empty_folder(tmp_path, tok):
    with pytest.raises(UserError, match=r"'BAAI/nope' does not exist; for a Hugging Face dataset write hf:BAAI/nope"):
        prep(tok, "BAAI/nope", tmp_path / "o")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"x.csv: unsupported file type"):
        prep(tok, tmp_path / "x.csv", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no .jsonl, .json, .parquet files in this folder"):
        prep(tok, tmp_path / "empty", tmp_path / "o")


def test_dataset_saved_to_disk(tmp_path, tok, reference):
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    card = prep(tok, tmp_path / "saved", tmp_path / "out")
    assert splits(tmp_path / "out") == reference[1]
    assert card.source_info["fingerprint"]
    canonical = b"".join(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                         for r in RECORDS)
    assert card.content_hash == hashlib.sha256(canonical).hexdigest()


def test_dataset_dict_saved_to_disk_uses_data_split(tmp_path, tok, reference):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                               "test": datasets.Dataset.from_list(RECORDS[:5])})
    dd.save_to_disk(str(tmp_path / "saved"))
    prep(tok, tmp_path / "saved", tmp_path / "out")
    assert splits(tmp_path / "out") == reference[1]
    card = prep(tok, tmp_path / "saved", tmp_path / "out2", "data.split=test")
    assert card.counts["read"] == 5
    with pytest.raises(UserError, match=r"data.split: 'dev' is not a split of .* \(splits: train, test\)"):
        prep(tok, tmp_path / "saved", tmp_path / "out3", "data.split=dev")


def make_hub_cache(cache_root, repo_id, records):
    """The layout `load_dataset(repo_id)` leaves in HF_DATASETS_CACHE when it ran online once:
    <namespace>___<name>/default/0.0.0/<hash>/<name>-train.arrow + dataset_info.json."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    src = write_jsonl(cache_root.parent / "src.jsonl", records)
    builder = Json(cache_dir=str(cache_root), dataset_name=f"{namespace}___{name}", config_name="default",
                   config_id="default", data_files={"train": str(src)}, hash="0123abcd")
    builder.download_and_prepare()
    for arrow in cache_root.glob(f"{namespace}___{name}/*/*/*/{namespace}___{name}-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace(f"{namespace}___{name}-", f"{name}-")))


def test_hub_dataset_from_the_local_cache_offline(tmp_path, tok, reference, monkeypatch):
    import datasets

    cache = tmp_path / "hf-datasets"
    make_hub_cache(cache, "org/toy-instruct", RECORDS)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    card = prep(tok, "hf:org/toy-instruct", tmp_path / "out")
    assert splits(tmp_path / "out") == reference[1]
    assert card.source == "hf:org/toy-instruct" and card.source_info["split"] == "train"
    with pytest.raises(UserError, match=r"cannot load hf:org/missing .*offline mode is on and it is not in the local"):
        prep(tok, "hf:org/missing", tmp_path / "out2")
    with pytest.raises(UserError, match=r"empty dataset id"):
        prep(tok, "hf:@main", tmp_path / "out3")


@pytest.mark.integration
def test_s3_object_and_prefix(s3_bucket, tmp_path, tok, reference):
    from llmneo.storage.s3 import client

    s3 = client()
    body = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    s3.put_object(Bucket=s3_bucket, Key="one/data.jsonl", Body=body, ChecksumAlgorithm="SHA256")
    card = prep(tok, f"s3://{s3_bucket}/one/data.jsonl", tmp_path / "obj")
    assert splits(tmp_path / "obj") == reference[1]
    assert card.content_hash == hashlib.sha256(body).hexdigest()
    assert card.source_info["s3_uri"] == f"s3://{s3_bucket}/one/data.jsonl"
    half = len(RECORDS) // 2
    for key, recs in (("many/part-0.jsonl", RECORDS[:half]), ("many/part-1.jsonl", RECORDS[half:])):
        s3.put_object(Bucket=s3_bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in recs).encode(),
                      ChecksumAlgorithm="SHA256")
    prep(tok, f"s3://{s3_bucket}/many", tmp_path / "prefix")
    assert splits(tmp_path / "prefix") == reference[1]
    with pytest.raises(UserError, match=r"s3://.*/nothing: no objects under this prefix"):
        prep(tok, f"s3://{s3_bucket}/nothing", tmp_path / "none")
    with pytest.raises(UserError, match=r"s3://no-such-bucket-zz/x.jsonl: .*"):
        prep(tok, "s3://no-such-bucket-zz/x.jsonl", tmp_path / "nobucket")


def test_sharegpt_dataset_with_nested_features_saved_to_disk(tmp_path, tok):
    """Infinity-Instruct's shape through datasets: conversations come back as lists of dicts."""
    import datasets

    records = [{"id": i, "conversations": [{"from": "human", "value": f"Name a number above {i}."},
                                           {"from": "gpt", "value": f"{i + 1} is above {i}."}],
                "label": {"cate": "math"}} for i in range(8)]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    card = prep(tok, tmp_path / "saved", tmp_path / "out")
    assert card.formats == {"sharegpt": 8} and card.counts["kept"] == 8


HUB_PROBE = """
import sys
from llmneo import data_sources
from llmneo.config import load_config
from llmneo.errors import guarded

def go():
    with data_sources.open_source(load_config("tiny", ["data.source=hf:org/missing"]).data):
        pass

guarded(go)
"""


def test_an_unreachable_hub_is_one_line_in_seconds(tmp_path):
    """Online mode with the hub unreachable (here: HF_ENDPOINT on a closed local port, as a machine
    without internet sees a DNS failure): huggingface_hub retried 5 times with backoff (~30 s) and
    printed a line per retry; now one line saying the hub is unreachable, without retries."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HUB_PROBE], env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.source: hf:org/missing"), done.stderr
    assert "unreachable" in lines[0] and "\x1b" not in done.stderr, lines[0]
    print(f"refused in {seconds:.1f}s")  # the retries alone took ~30 s; a retry would print its own line
