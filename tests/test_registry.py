import hashlib
import json
import threading

import pytest

from llmneo.errors import UserError
from llmneo.registry import LocalRegistry, file_entries, verify


def make_model(d, content=b"weights"):
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(content)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "tok.json").write_text("{}")
    return d


def test_manifest_checksums_and_sizes(tmp_path):
    model = make_model(tmp_path / "m", b"x" * 1000)
    entries = file_entries(model)
    assert [e["path"] for e in entries] == ["config.json", "model.safetensors", "sub/tok.json"]
    st = next(e for e in entries if e["path"] == "model.safetensors")
    assert st["size"] == 1000 and st["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()


def test_register_writes_manifest_last_and_verifies(tmp_path):
    reg = LocalRegistry(tmp_path / "reg")
    manifest = reg.register("demo", make_model(tmp_path / "m"), {"git_commit": "abc"}, {"kl": 0.1})
    assert manifest["version"] == "v1"
    vdir = tmp_path / "reg" / "demo" / "v1"
    on_disk = json.loads((vdir / "manifest.json").read_text())
    assert on_disk["files"] == manifest["files"] and on_disk["lineage"]["git_commit"] == "abc"
    verify(vdir, on_disk)
    assert (vdir / "model.safetensors").read_bytes() == b"weights"


def test_corruption_names_the_file(tmp_path):
    reg = LocalRegistry(tmp_path / "reg")
    reg.register("demo", make_model(tmp_path / "m"), {}, {})
    vdir = tmp_path / "reg" / "demo" / "v1"
    (vdir / "sub" / "tok.json").write_text("{tampered}")
    with pytest.raises(UserError, match=r"sub/tok.json: sha256 mismatch"):
        verify(vdir, reg.manifest("demo", "v1"))


def test_idempotent_and_new_versions(tmp_path):
    reg = LocalRegistry(tmp_path / "reg")
    a = reg.register("demo", make_model(tmp_path / "a", b"A"), {}, {})
    again = reg.register("demo", tmp_path / "a", {}, {})
    b = reg.register("demo", make_model(tmp_path / "b", b"B"), {}, {})
    assert (a["version"], again["version"], b["version"]) == ("v1", "v1", "v2")
    assert again.get("reused") is True
    assert reg.versions("demo") == ["v1", "v2"]


def test_incomplete_version_is_invisible(tmp_path):
    reg = LocalRegistry(tmp_path / "reg")
    (tmp_path / "reg" / "demo" / "v1").mkdir(parents=True)  # an interrupted registration
    assert reg.versions("demo") == []
    assert reg.register("demo", make_model(tmp_path / "m"), {}, {})["version"] == "v2"


def test_concurrent_registrations_get_distinct_versions(tmp_path):
    reg = LocalRegistry(tmp_path / "reg")
    models = [make_model(tmp_path / f"m{i}", f"content {i}".encode()) for i in range(8)]
    results = []
    threads = [threading.Thread(target=lambda m=m: results.append(reg.register("demo", m, {}, {})))
               for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(r["version"][1:]) for r in results) == list(range(1, 9))


def test_bad_name(tmp_path):
    with pytest.raises(UserError, match="registry.name"):
        LocalRegistry(tmp_path).register("../evil", make_model(tmp_path / "m"), {}, {})
