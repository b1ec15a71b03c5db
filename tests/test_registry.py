"""The model registry, the same behaviours on both backends: a local folder, and S3 against a real
SeaweedFS server (the ``s3`` cases are integration tests: they start the server)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid

import pytest

from llmneo.cards import EvalCard, weight_digests
from llmneo.errors import UserError
from llmneo.registry import LocalRegistry, file_entries, open_registry, parse_ref, verify

SMALL_PARTS = {"multipart_threshold_mb": 5, "multipart_chunk_mb": 5, "max_concurrency": 2}


class Settings:
    """A stand-in RegistryConfig with small multipart sizes, so a 12 MiB file goes up in 3 parts."""

    def __init__(self, uri):
        self.uri = uri
        self.__dict__.update(SMALL_PARTS)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def registry_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/models"


def open_(uri):
    return open_registry(Settings(uri))


def make_model(d, content=b"weights", big: int = 0):
    """A small model-like folder; ``big`` adds a file of that many random bytes (first in order)."""
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(content)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "tok.json").write_text("{}")
    if big:
        (d / "a_big.bin").write_bytes(os.urandom(big))
    return d


def tree(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Content and references (no store)
# --------------------------------------------------------------------------------------------


def test_manifest_checksums_and_sizes(tmp_path):
    model = make_model(tmp_path / "m", b"x" * 1000)
    entries = file_entries(model)
    assert [e["path"] for e in entries] == ["config.json", "model.safetensors", "sub/tok.json"]
    st = next(e for e in entries if e["path"] == "model.safetensors")
    assert st["size"] == 1000 and st["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()


@pytest.mark.parametrize("ref, parsed", [
    ("m", ("m", None, None)), ("m:v3", ("m", "v3", None)), ("m:3", ("m", "v3", None)),
    ("my.model-2@production", ("my.model-2", None, "production")),
])
def test_parse_ref(ref, parsed):
    assert parse_ref(ref) == parsed


@pytest.mark.parametrize("ref", ["", "a:b:c", "m@", "m:x1", "../evil", "m@a@b"])
def test_bad_refs_are_clear(ref):
    with pytest.raises(UserError, match="expected NAME|version must look like"):
        parse_ref(ref)


# --------------------------------------------------------------------------------------------
# Behaviours on both backends
# --------------------------------------------------------------------------------------------


def test_round_trip_is_byte_equal(registry_uri, tmp_path):
    src = make_model(tmp_path / "m", os.urandom(3000), big=12 * 2**20)  # 12 MiB: 3 parts on S3
    reg = open_(registry_uri)
    manifest = reg.register("demo", src, {"git_commit": "abc"}, {"kl_to_teacher": 0.1}, aliases=["latest"])
    assert manifest["version"] == "v1" and manifest["uri"].endswith("demo/v1")
    assert manifest["size"] == sum(len(b) for b in tree(src).values())
    pulled = reg.pull("demo@latest", tmp_path / "out")
    assert pulled["version"] == "v1"
    out = tree(tmp_path / "out")
    assert json.loads(out.pop("manifest.json")) == manifest
    assert out == tree(src)  # byte-equal, same relative paths
    verify(tmp_path / "out", manifest)
    # a pulled folder is the same content: registering it again is the same version
    assert reg.register("demo", tmp_path / "out", {}, {})["version"] == "v1"


def test_multipart_upload_with_sha256_per_part(s3_bucket, tmp_path):
    from llmneo.storage.s3 import client

    src = make_model(tmp_path / "m", big=12 * 2**20)
    open_(f"s3://{s3_bucket}/models").register("demo", src, {}, {})
    head = client().head_object(Bucket=s3_bucket, Key="models/demo/v1/a_big.bin", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-3")  # composite checksum of 3 SHA-256-checked parts
    assert head["Metadata"]["sha256"] == hashlib.sha256((src / "a_big.bin").read_bytes()).hexdigest()


def test_idempotent_new_versions_and_aliases(registry_uri, tmp_path):
    reg = open_(registry_uri)
    a = reg.register("demo", make_model(tmp_path / "a", b"A"), {}, {}, aliases=["latest"])
    again = reg.register("demo", tmp_path / "a", {}, {}, aliases=["latest"])
    b = reg.register("demo", make_model(tmp_path / "b", b"B"), {}, {}, aliases=["latest"])
    assert (a["version"], again["version"], b["version"]) == ("v1", "v1", "v2")
    assert again.get("reused") is True and "reused" not in b
    assert reg.versions("demo") == ["v1", "v2"]
    assert reg.aliases("demo") == {"latest": "v2"}
    assert [(e["previous"], e["version"]) for e in reg.alias_history("demo", "latest")] == [(None, "v1"), ("v1", "v2")]
    assert reg.resolve("demo") == ("demo", "v2") and reg.resolve("demo:1") == ("demo", "v1")


def test_promote_history_and_lookups(registry_uri, tmp_path):
    reg = open_(registry_uri)
    for i in range(3):
        reg.register("demo", make_model(tmp_path / f"m{i}", f"w{i}".encode()),
                     {"pipeline_run_id": f"run-{i}", "git_commit": "c0ffee", "config_hash": "h", "dataset_hash": "d",
                      "teacher": "T", "student": "S"}, {"kl_to_teacher": 0.1 * i})
    assert reg.promote("demo:v2", "production")["previous"] is None
    event = reg.promote("demo:v3", "production")
    assert (event["previous"], event["version"]) == ("v2", "v3")
    assert reg.resolve("demo@production") == ("demo", "v3")
    assert reg.show("demo@production")["aliases"] == ["production"]
    lineage = reg.lineage("demo:v2")
    assert (lineage["pipeline_run_id"], lineage["git_commit"], lineage["teacher"], lineage["metrics"]) == \
        ("run-1", "c0ffee", "T", {"kl_to_teacher": 0.1})
    assert [e["version"] for e in reg.alias_history("demo", "production")] == ["v2", "v3"]
    assert reg.names() == ["demo"]
    headers, rows = reg.version_rows("demo")
    assert [r[0] for r in rows] == ["v1", "v2", "v3"] and rows[2][headers.index("aliases")] == "production"
    with pytest.raises(UserError, match="demo has no alias 'staging' \\(aliases: production\\)"):
        reg.resolve("demo@staging")
    with pytest.raises(UserError, match=r"demo:v9 not found \(versions: v1, v2, v3\)"):
        reg.show("demo:v9")
    with pytest.raises(UserError, match="no model named 'nope'"):
        reg.pull("nope@latest", tmp_path / "x")
    with pytest.raises(UserError, match="must match"):
        reg.promote("demo:v1", "v7")  # an alias that looks like a version would be ambiguous


def test_concurrent_registrations_get_distinct_versions(registry_uri, tmp_path):
    models = [make_model(tmp_path / f"m{i}", f"content {i}".encode()) for i in range(10)]
    results, errors = {}, []

    def register(i):
        try:  # each thread its own registry object (own S3 client), as separate processes would
            results[i] = open_(registry_uri).register("demo", models[i], {}, {}, aliases=["latest"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reg = open_(registry_uri)
    assert sorted(int(r["version"][1:]) for r in results.values()) == list(range(1, 11))
    assert reg.versions("demo") == [f"v{n}" for n in range(1, 11)]
    for i, manifest in results.items():  # each version holds what its registrar uploaded
        stored = reg.manifest("demo", manifest["version"])
        assert next(f for f in stored["files"] if f["path"] == "model.safetensors")["sha256"] == \
            hashlib.sha256(f"content {i}".encode()).hexdigest()
    assert len(reg.alias_history("demo", "latest")) == 10  # every move kept, none lost


KILL_CHILD = r"""
import sys, time
from llmneo.registry import open_registry
from llmneo.storage.local import LocalStore
from llmneo.storage.s3 import S3Store

class S: pass
s = S(); s.uri = sys.argv[1]; s.multipart_threshold_mb = 5; s.multipart_chunk_mb = 5; s.max_concurrency = 1
for store in (LocalStore, S3Store):
    original = store.put_file
    def put_file(self, key, src, sha256, progress=None, original=original):
        sent = [0]
        def hook(n):
            sent[0] += n
            if sent[0] >= 6 * 2**20:  # half-way through the first (12 MiB) file: stop here
                print("MIDWAY", flush=True)
                time.sleep(120)
        return original(self, key, src, sha256, hook)
    store.put_file = put_file
open_registry(s).register("demo", sys.argv[2], {}, {})
print("FINISHED", flush=True)
"""


def test_upload_killed_midway_leaves_no_visible_version(registry_uri, tmp_path):
    src = make_model(tmp_path / "m", big=12 * 2**20)
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, registry_uri, str(src)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "MIDWAY"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    reg = open_(registry_uri)
    assert reg.versions("demo") == [] and reg.names() == []
    with pytest.raises(UserError, match="no model named 'demo'"):
        reg.show("demo")
    # the killed registration's number stays taken; the next one is complete and visible
    assert reg.register("demo", src, {}, {})["version"] == "v2"
    assert reg.versions("demo") == ["v2"]


def corrupt(registry_uri, key, data):
    if registry_uri.startswith("s3://"):
        from llmneo.storage.s3 import client, parse_uri

        bucket, prefix = parse_uri(registry_uri)
        client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
    else:
        from pathlib import Path

        (Path(registry_uri) / key).write_bytes(data)


@pytest.mark.parametrize("damage", [b"[]", b"{tampered}"])  # same size, other size
def test_corrupted_object_fails_pull_naming_the_file(registry_uri, tmp_path, damage):
    reg = open_(registry_uri)
    reg.register("demo", make_model(tmp_path / "m"), {}, {}, aliases=["production"])
    corrupt(registry_uri, "demo/v1/sub/tok.json", damage)
    with pytest.raises(UserError, match=r"demo:v1: sub/tok.json: sha256 mismatch"):
        reg.pull("demo@production", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-pulled left behind
    assert not [p.name for p in tmp_path.iterdir() if ".pull-" in p.name]  # nor a temporary folder


def test_pull_refuses_a_non_empty_folder(registry_uri, tmp_path):
    reg = open_(registry_uri)
    reg.register("demo", make_model(tmp_path / "m"), {}, {})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        reg.pull("demo", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_bad_names(registry_uri, tmp_path):
    reg = open_(registry_uri)
    with pytest.raises(UserError, match="registry.name"):
        reg.register("../evil", make_model(tmp_path / "m"), {}, {})
    with pytest.raises(UserError, match="not a folder"):
        reg.register("demo", tmp_path / "missing", {}, {})


# --------------------------------------------------------------------------------------------
# S3 errors
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_wrong_credentials_are_clear(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    reg = open_(f"s3://{s3_bucket}/models")
    with pytest.raises(UserError, match=r"registry s3://.*: access denied .*check the S3 credentials"):
        reg.register("demo", make_model(tmp_path / "m"), {}, {})
    with pytest.raises(UserError, match="access denied"):
        reg.versions("demo")


@pytest.mark.integration
def test_missing_bucket_is_clear(s3_env, tmp_path):
    from llmneo.storage.s3 import client

    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    reg = open_(f"s3://{bucket}/models")
    with pytest.raises(UserError, match=f"bucket '{bucket}' does not exist"):
        reg.register("demo", make_model(tmp_path / "m"), {}, {})
    with pytest.raises(UserError, match="does not exist"):
        reg.names()
    assert bucket not in [b["Name"] for b in client().list_buckets().get("Buckets", [])]  # not auto-created


def test_local_registry_class_is_the_same_registry(tmp_path):
    reg = LocalRegistry(tmp_path / "reg")
    reg.register("demo", make_model(tmp_path / "m"), {}, {})
    assert (tmp_path / "reg" / "demo" / "v1" / "manifest.json").is_file()
    assert open_registry(str(tmp_path / "reg")).versions("demo") == ["v1"]


def merge_eval_output(d, passed=True, **metrics):
    """A merge-eval output folder: model files, the eval.json report and, last, its card."""
    model = make_model(d)
    metrics = metrics or {"kl_to_teacher": 0.2, "llmneo_mc/acc": 0.5}
    gate = {"passed": passed, "reasons": [] if passed else ["kl_to_teacher 0.9 > eval.max_kl_to_teacher 0.5"]}
    (model / "eval.json").write_text(json.dumps({"kind": "eval", "metrics": metrics, "gate": gate}))
    EvalCard(metrics=metrics, teacher="smollm2", student="prune", method="neo", dataset_hash="ds123",
             gate=gate, weights=weight_digests(model)).write(model)
    return model


def test_register_step_records_lineage_and_aliases(tmp_path, monkeypatch):
    from llmneo.config import load_config
    from llmneo.steps import register_model

    monkeypatch.setenv("LLMNEO_GIT_SHA", "0123abc")
    model = merge_eval_output(tmp_path / "model")
    cfg = load_config("tiny", [f"registry.uri={tmp_path / 'reg'}", "registry.aliases=latest,candidate"])
    manifest = register_model(cfg, model, "run-9")
    lineage = manifest["lineage"]
    assert (lineage["pipeline_run_id"], lineage["git_commit"], lineage["config_hash"], lineage["dataset_hash"],
            lineage["teacher"], lineage["student"]) == ("run-9", "0123abc", cfg.hash(), "ds123", "smollm2", "prune")
    assert lineage["config"]["distill"]["alpha"] == cfg.distill.alpha  # the full resolved configuration
    assert manifest["metrics"] == {"kl_to_teacher": 0.2, "llmneo_mc/acc": 0.5}
    reg = open_registry(str(tmp_path / "reg"))
    assert reg.aliases("tiny-neo") == {"candidate": "v1", "latest": "v1"}
    assert register_model(cfg, model, "run-10")["reused"] is True  # a retried step is the same version
    assert reg.versions("tiny-neo") == ["v1"]
    with pytest.raises(UserError, match="m-missing: no card.json, not a completed merge-eval output"):
        register_model(cfg, tmp_path / "m-missing", "run-11")


# --------------------------------------------------------------------------------------------
# Forged manifests and links out of the model folder
# --------------------------------------------------------------------------------------------


def plant(registry_uri, key, data):
    """Write ``key`` into the registry as someone with write access to it could."""
    import contextlib

    from llmneo.storage import open_store

    store = open_store(registry_uri)
    with contextlib.suppress(UserError):  # SeaweedFS refuses keys with '..' parts (AWS S3 keeps them)
        store.put_bytes(key, data)


@pytest.mark.parametrize("evil", ["../../x", "ABS"])
def test_pull_refuses_a_forged_manifest_path_and_writes_nothing_outside(registry_uri, tmp_path, evil):
    reg = open_(registry_uri)
    v1 = reg.register("demo", make_model(tmp_path / "m"), {}, {})
    payload = b"#!/bin/sh\necho owned\n"
    if evil == "ABS":
        evil = str(tmp_path / "outside" / "abs.sh")  # absolute: would be written where it says
    forged = {**v1, "version": "v2", "files": v1["files"] + [
        {"path": evil, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}]}
    plant(registry_uri, f"demo/v2/{evil}", payload)  # the matching object, next to the real files
    for e in v1["files"]:
        plant(registry_uri, f"demo/v2/{e['path']}", tree(tmp_path / "m")[e["path"]])
    plant(registry_uri, "demo/v2/manifest.json", json.dumps(forged).encode())
    assert reg.versions("demo") == ["v1", "v2"]
    work = tmp_path / "work"
    work.mkdir()
    before = {p for p in tmp_path.rglob("*") if not str(p).startswith(registry_uri)}
    with pytest.raises(UserError, match=rf"demo:v2: manifest.json: refusing unsafe path '{evil}' \("):
        reg.pull("demo:v2", work / "out")
    after = {p for p in tmp_path.rglob("*") if not str(p).startswith(registry_uri)}
    assert after == before  # no dest, no temporary folder, no x next to it, no outside/abs.sh
    assert not (tmp_path / "x").exists() and not (tmp_path / "outside").exists()
    assert reg.pull("demo:v1", work / "out")["version"] == "v1"  # the honest version still pulls


def test_register_refuses_a_link_out_of_the_model_folder(tmp_path):
    reg = open_(str(tmp_path / "registry"))
    secret = tmp_path / "secret.key"
    secret.write_text("private")
    model = make_model(tmp_path / "m")
    (model / "sub" / "extra.json").symlink_to(secret)
    with pytest.raises(UserError, match=r"m: sub/extra.json is a symbolic link to .*secret.key, outside the model "
                                        r"folder; copy the file in instead$"):
        reg.register("demo", model, {}, {})
    assert reg.names() == []
    (model / "sub" / "extra.json").unlink()
    (model / "sub" / "extra.json").symlink_to(model / "config.json")  # a link inside the folder is fine
    assert reg.register("demo", model, {}, {})["version"] == "v1"


def test_register_refuses_a_linked_folder_out(tmp_path):
    reg = open_(str(tmp_path / "registry"))
    model = make_model(tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    (model / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UserError, match=r"more is a symbolic link to .*elsewhere, outside the model folder"):
        reg.register("demo", model, {}, {})


def test_register_refuses_an_interrupted_merge_eval(tmp_path):
    """merge-eval killed by a full disk: a truncated eval.json and no card. Nothing is registered."""
    from llmneo.config import load_config
    from llmneo.steps import register_model

    cfg = load_config("tiny", [f"registry.uri={tmp_path / 'reg'}"])
    register_model(cfg, merge_eval_output(tmp_path / "good"), "run-1")
    reg = open_registry(str(tmp_path / "reg"))
    model = merge_eval_output(tmp_path / "model", kl_to_teacher=0.1)
    (model / "card.json").unlink()
    report = (model / "eval.json").read_text()
    (model / "eval.json").write_text(report[: len(report) // 2])
    with pytest.raises(UserError) as e:
        register_model(cfg, model, "run-2")
    assert str(e.value) == (f"{model}: no card.json, not a completed merge-eval output (the merge-eval step "
                            f"writes it last: run `llmneo merge-eval` into this folder)")
    (model / "card.json").write_text('{"kind": "model", "role": "distilled", "gate": {"pas')  # torn card
    with pytest.raises(UserError, match=r"card.json: unreadable merge-eval output card: .*llmneo merge-eval"):
        register_model(cfg, model, "run-3")
    assert reg.versions("tiny-neo") == ["v1"] and reg.aliases("tiny-neo") == {"latest": "v1"}


def test_register_refuses_a_failed_gate_unless_forced_with_a_reason(tmp_path):
    from llmneo.config import load_config
    from llmneo.steps import register_model

    cfg = load_config("tiny", [f"registry.uri={tmp_path / 'reg'}"])
    register_model(cfg, merge_eval_output(tmp_path / "good"), "run-1")
    reg = open_registry(str(tmp_path / "reg"))
    failed = merge_eval_output(tmp_path / "failed", passed=False, kl_to_teacher=0.9)
    with pytest.raises(UserError, match=r"failed: the gate failed \(kl_to_teacher 0.9 > eval.max_kl_to_teacher "
                                        r"0.5\); not registered \(--force REASON"):
        register_model(cfg, failed, "run-2")
    assert reg.versions("tiny-neo") == ["v1"] and reg.aliases("tiny-neo") == {"latest": "v1"}
    with pytest.raises(UserError, match="give the reason"):
        register_model(cfg, failed, "run-2", force="  ")
    manifest = register_model(cfg, failed, "run-2", force="hotfix approved by the on-call reviewer")
    # a forced version moves no alias unless asked
    assert manifest["version"] == "v2" and reg.aliases("tiny-neo") == {"latest": "v1"}
    lineage = reg.lineage("tiny-neo:v2")
    assert lineage["forced"] == "hotfix approved by the on-call reviewer" and lineage["gate"]["passed"] is False
    assert "forced" not in reg.lineage("tiny-neo:v1")


def test_register_cli_force_records_the_reason(tmp_path, capsys):
    from llmneo.cli import main

    failed = merge_eval_output(tmp_path / "failed", passed=False)
    args = ["register", "--preset", "tiny", "--model", str(failed), f"registry.uri={tmp_path / 'reg'}"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "the gate failed" in err
    assert main([*args[:5], "--force", "release anyway: reviewed", *args[5:]]) == 0
    assert "registered tiny-neo:v1" in capsys.readouterr().out
    assert open_registry(str(tmp_path / "reg")).lineage("tiny-neo:v1")["forced"] == "release anyway: reviewed"


# --------------------------------------------------------------------------------------------
# Links planted inside a shared local registry folder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["demo/v2", "demo", "demo/_aliases", "demo/_aliases/latest"])
def test_a_link_planted_in_a_local_registry_is_never_followed_out(tmp_path, planted):
    """Someone with write access to a shared registry folder plants ``<name>/v2 -> elsewhere`` (or a
    link higher up, or in place of the alias events): register and promote refuse in one line naming
    the link, nothing outside the registry root is written or created, and what was registered before
    stays listed and pullable."""
    root = tmp_path / "registry"
    reg = open_(str(root))
    reg.register("demo", make_model(tmp_path / "m1", b"one"), {}, {}, aliases=["latest"])
    reg.register("demo", make_model(tmp_path / "m0", b"zero"), {}, {})  # v2 exists: the next is v3
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.txt").write_text("do not overwrite")
    if planted == "demo/v2":
        planted = "demo/v3"
    link = root / planted
    if link.exists():  # move the real folder aside: the link points at a copy elsewhere
        os.rename(link, elsewhere / "real")
        link.symlink_to(elsewhere / "real", target_is_directory=True)
    else:
        link.symlink_to(elsewhere, target_is_directory=True)
    before = tree(elsewhere)

    with pytest.raises(UserError) as e:
        reg.register("demo", make_model(tmp_path / "m2", b"two"), {}, {}, aliases=["latest"])
    message = str(e.value)
    assert "\n" not in message and f"{planted} is a symbolic link" in message and "refusing" in message, message
    if planted.startswith("demo/_aliases"):
        with pytest.raises(UserError, match=f"{planted} is a symbolic link"):
            reg.promote("demo:v2", "latest" if planted.endswith("latest") else "production")
    assert tree(elsewhere) == before
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(["victim.txt"] + (["real"] if
                                                                   (elsewhere / "real").exists() else []))
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    if planted != "demo":  # the registered versions stay listed and pullable
        assert reg.names() == ["demo"] and reg.versions("demo")[:2] == ["v1", "v2"]
        reg.pull("demo:v1", tmp_path / "pulled")
        assert tree(tmp_path / "pulled")["model.safetensors"] == b"one"


def test_pull_refuses_a_version_folder_that_is_a_link(tmp_path):
    """``<name>/v1`` swapped for a link to a copy elsewhere: the registry no longer reads it (it could
    change under the reader); ``ls`` does not break."""
    root = tmp_path / "registry"
    reg = open_(str(root))
    reg.register("demo", make_model(tmp_path / "m1"), {}, {})
    reg.register("other", make_model(tmp_path / "m2", b"x"), {}, {})
    os.rename(root / "demo" / "v1", tmp_path / "copy")
    (root / "demo" / "v1").symlink_to(tmp_path / "copy", target_is_directory=True)
    assert reg.names() == ["other"]
    with pytest.raises(UserError, match="no model named 'demo'"):
        reg.pull("demo:v1", tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


# --------------------------------------------------------------------------------------------
# Metrics tied to the weights they were measured on; forced versions
# --------------------------------------------------------------------------------------------


def test_register_refuses_weights_swapped_after_merge_eval(tmp_path):
    """The weights in a merge-eval folder replaced after evaluation (the base student's, say): the
    card's SHA-256 of every weight file no longer matches, and nothing is registered."""
    from llmneo.config import load_config
    from llmneo.steps import register_model

    cfg = load_config("tiny", [f"registry.uri={tmp_path / 'reg'}"])
    model = merge_eval_output(tmp_path / "model")
    assert EvalCard.read(model).weights == {"model.safetensors": hashlib.sha256(b"weights").hexdigest()}
    (model / "model.safetensors").write_bytes(b"the base student")
    with pytest.raises(UserError) as e:
        register_model(cfg, model, "run-1")
    assert str(e.value) == (f"{model}: model.safetensors differs from the weights merge-eval evaluated (sha256 "
                            f"{hashlib.sha256(b'the base student').hexdigest()[:16]}…, the card says "
                            f"{hashlib.sha256(b'weights').hexdigest()[:16]}…); not registered: run merge-eval "
                            f"on these weights")
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "model-00002.safetensors").write_bytes(b"extra shard")
    with pytest.raises(UserError, match=r"model: model-00002.safetensors was not evaluated by merge-eval"):
        register_model(cfg, model, "run-1")
    (model / "model-00002.safetensors").unlink()
    (model / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"model: model.safetensors, evaluated by merge-eval, is missing"):
        register_model(cfg, model, "run-1")
    assert open_registry(str(tmp_path / "reg")).names() == []


def test_a_card_without_weight_digests_is_refused(tmp_path):
    from llmneo.config import load_config
    from llmneo.steps import register_model

    cfg = load_config("tiny", [f"registry.uri={tmp_path / 'reg'}"])
    model = merge_eval_output(tmp_path / "model")
    card = EvalCard.read(model)
    card.weights = {}
    card.write(model)
    with pytest.raises(UserError, match=r"model: the merge-eval card records no weight digests .*re-run merge-eval"):
        register_model(cfg, model, "run-1")


def test_forced_version_moves_an_alias_only_when_asked_and_is_marked(tmp_path, capsys):
    from llmneo.cli import main

    reg_dir = tmp_path / "reg"
    good = merge_eval_output(tmp_path / "good")
    assert main(["register", "--preset", "tiny", "--model", str(good), f"registry.uri={reg_dir}"]) == 0
    failed = merge_eval_output(tmp_path / "failed", passed=False, kl_to_teacher=0.9)
    base = ["register", "--preset", "tiny", "--model", str(failed), "--force", "reviewed", f"registry.uri={reg_dir}"]
    assert main(base) == 0
    reg = open_registry(str(reg_dir))
    assert reg.versions("tiny-neo") == ["v1", "v2"] and reg.aliases("tiny-neo") == {"latest": "v1"}
    assert main([*base, "--alias", "latest"]) == 0  # the same content: v2 again, now latest as asked
    assert reg.versions("tiny-neo") == ["v1", "v2"] and reg.aliases("tiny-neo") == {"latest": "v2"}
    capsys.readouterr()
    assert main(["registry", "ls", "tiny-neo", "--registry", str(reg_dir)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
    assert "forced" in rows["v2"] and "forced" not in rows["v1"]
    assert main(["registry", "show", "tiny-neo:v2", "--registry", str(reg_dir)]) == 0
    assert "forced: reviewed (gate failed: kl_to_teacher 0.9 > eval.max_kl_to_teacher 0.5)" in capsys.readouterr().out
