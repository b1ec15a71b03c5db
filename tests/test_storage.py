"""llmneo.storage: the Store contract on both backends (a folder, and S3 against a real SeaweedFS
server), the one path check every download goes through, and the attacks it stops."""

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path

import pytest

from llmneo.errors import UserError
from llmneo.storage import (
    Entry,
    LocalStore,
    Store,
    download_prefix,
    open_object,
    open_store,
    safe_path,
    upload_dir,
)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/root"


def tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# The contract, on both backends
# --------------------------------------------------------------------------------------------


def test_store_contract(store_uri, tmp_path):
    store = open_store(store_uri)
    assert isinstance(store, Store)
    assert store.create("a/claim", b"one") is True
    assert store.create("a/claim", b"two") is False  # conditional create: the first writer wins
    assert store.get_bytes("a/claim") == b"one"
    store.put_bytes("a/claim", b"three")
    assert store.get_bytes("a/claim") == b"three" and store.get_bytes("a/none") is None
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3000))
    store.put_file("a/sub/w.bin", src, hashlib.sha256(src.read_bytes()).hexdigest())
    got = store.get_file("a/sub/w.bin", tmp_path / "out" / "w.bin")
    assert got.read_bytes() == src.read_bytes() and not list((tmp_path / "out").glob(".*"))  # no temp left
    assert store.list("a/") == ["a/claim", "a/sub/w.bin"] and store.list("a/sub/") == ["a/sub/w.bin"]
    assert [(e.key, e.size) for e in store.entries("a/")] == [("a/claim", 5), ("a/sub/w.bin", 3000)]
    assert all(isinstance(e, Entry) and e.tag for e in store.entries())
    assert store.children("") == ["a"] and store.children("a/") == ["sub"]
    assert store.url("a/claim").endswith("a/claim")
    assert store.delete_prefix("a/sub/") == 1 and store.list() == ["a/claim"]
    assert store.delete_prefix() == 1 and store.list() == []


def test_upload_dir_and_download_prefix_round_trip(store_uri, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(os.urandom(5000))
    assert upload_dir(src, f"{store_uri}/model") == 2
    files = download_prefix(f"{store_uri}/model", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == ["config.json", "sub/w.bin"]
    assert tree(tmp_path / "out") == tree(src)
    store, key = open_object(f"{store_uri}/model/config.json")
    assert (key, store.get_bytes(key)) == ("config.json", b'{"a": 1}')


def test_local_temp_files_are_invisible_to_listings(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_bytes("x/done", b"1")
    (tmp_path / "s" / "x" / ".tmp-1234abcd-half").write_bytes(b"half an upload")
    assert store.list() == ["x/done"]


def test_open_store_by_scheme(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}").root == tmp_path
    with pytest.raises(UserError, match=r"no storage backend for gs:// \(supported"):
        open_store("gs://bucket/x")
    with pytest.raises(UserError, match="empty location"):
        open_store("")


# --------------------------------------------------------------------------------------------
# Path safety: one check before anything is written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/", "./a", "", "a/./b",
                                 "..\\..\\x", "a\\b", "C:evil", "c:/x", "a\0b", ".."])
def test_safe_path_refuses(tmp_path, rel):
    with pytest.raises(UserError, match=r"^m: refusing unsafe path"):
        safe_path(rel, tmp_path / "dest", "m")


def test_safe_path_refuses_a_link_out_and_accepts_ordinary_paths(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(tmp_path)
    with pytest.raises(UserError, match="resolves outside the destination"):
        safe_path("link/x", dest)
    assert safe_path("a/b.c/..d/.hidden", dest) == dest / "a/b.c/..d/.hidden"


def test_download_refuses_every_key_before_writing_any(tmp_path):
    """A folder store can hold a file named with backslashes (``..\\..\\x``), which a tool honouring
    Windows separators would write two levels up: the whole download is refused, nothing written."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_first.txt").write_text("fine")
    (src / "..\\..\\evil.txt").write_text("planted")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"refusing unsafe path '\.\.\\\\\.\.\\\\evil.txt'"):
        download_prefix(str(src), tmp_path / "dest")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # not even a_first.txt, no dest


# --------------------------------------------------------------------------------------------
# S3 sources: a key with .. or an absolute part below the prefix is refused
# --------------------------------------------------------------------------------------------


def forge_listing(monkeypatch, *keys):
    """SeaweedFS cleans ``..`` and ``//`` out of keys on write, AWS S3 keeps them: add such keys to
    the real listing the server returns, as a bucket on AWS S3 would list them."""
    from llmneo.storage.s3 import S3Store

    real = S3Store.entries

    def entries(self, prefix=""):
        return real(self, prefix) + [Entry(k, 7, "forged") for k in keys]

    monkeypatch.setattr(S3Store, "entries", entries)


@pytest.mark.integration
@pytest.mark.parametrize("forged", ["../../escaped-{u}.jsonl", "{tmp}/abs-{u}.jsonl"])
def test_s3_data_source_refuses_keys_outside_the_prefix(s3_bucket, tmp_path, monkeypatch, forged):
    from llmneo.config import load_config
    from llmneo.data_sources import open_source
    from llmneo.storage.s3 import client

    u = uuid.uuid4().hex[:8]
    forged = forged.format(u=u, tmp=tmp_path)
    client().put_object(Bucket=s3_bucket, Key="data/part-0.jsonl", Body=json.dumps({"text": "hi"}).encode())
    forge_listing(monkeypatch, forged)
    cfg = load_config("tiny", [f"data.source=s3://{s3_bucket}/data"])
    with pytest.raises(UserError, match=rf"s3://{s3_bucket}/data: refusing unsafe path"), open_source(cfg.data):
        pass
    assert not (tmp_path / f"abs-{u}.jsonl").exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"escaped-{u}.jsonl"))
    assert not list(Path(tempfile.gettempdir()).glob(f"*/escaped-{u}.jsonl"))


@pytest.mark.integration
def test_s3_model_source_refuses_keys_outside_the_prefix(s3_bucket, tmp_path, monkeypatch):
    from llmneo.models import s3_model_dir
    from llmneo.storage.s3 import client

    monkeypatch.setenv("LLMNEO_CACHE", str(tmp_path / "cache"))
    client().put_object(Bucket=s3_bucket, Key="models/m/config.json", Body=b"{}")
    forge_listing(monkeypatch, "../../../planted.py")
    with pytest.raises(UserError, match=r"teacher.source: s3://.*/models/m: refusing unsafe path '\.\./\.\./\.\./planted"):
        s3_model_dir(f"s3://{s3_bucket}/models/m")
    assert [p.name for p in (tmp_path / "cache").rglob("*")] == ["s3"]  # no model, no temp folder, no planted.py


@pytest.mark.integration
def test_s3_download_skips_empty_folder_markers(s3_bucket, tmp_path):
    """The AWS console's "Create folder" leaves a zero-byte object named ``prefix/`` (and ``prefix/sub/``):
    a folder marker, not tampering. download_prefix skips them and downloads the real objects."""
    from llmneo.storage.s3 import client

    s3 = client()
    for key in ("data/", "data/sub/"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    s3.put_object(Bucket=s3_bucket, Key="data/sub/part-0.jsonl", Body=b'{"text": "hi"}\n')
    files = download_prefix(f"s3://{s3_bucket}/data", tmp_path / "out")
    assert files == [tmp_path / "out" / "sub" / "part-0.jsonl"]
    assert tree(tmp_path / "out") == {"sub/part-0.jsonl": b'{"text": "hi"}\n'}
