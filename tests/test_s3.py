"""llmneo.storage (S3 backend, download_prefix) against a real S3 server (SeaweedFS on loopback)."""

import pytest

from llmneo.errors import UserError
from llmneo.storage import download_prefix
from llmneo.storage.s3 import client, parse_uri

pytestmark = pytest.mark.integration


def test_parse_uri():
    assert parse_uri("s3://bkt/x/y/") == ("bkt", "x/y")
    assert parse_uri("s3://bkt") == ("bkt", "")
    with pytest.raises(UserError, match="missing bucket"):
        parse_uri("s3:///x")
    # S3 bucket naming rules, checked before any network call
    for bad in ("b", "Bad_Bucket!", "UPPER", "-dash", "a..b", "192.168.1.1", "x" * 64):
        with pytest.raises(UserError, match=rf"'{bad}' is not a valid S3 bucket name"):
            parse_uri(f"s3://{bad}/x", f"data.source: s3://{bad}/x")


def test_download_prefix_round_trip_with_checksums(s3_bucket, tmp_path):
    s3 = client()
    blobs = {"model/config.json": b'{"a": 1}', "model/sub/w.bin": bytes(range(256)) * 1000}
    for key, body in blobs.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256")
    files = download_prefix(f"s3://{s3_bucket}/model", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == ["config.json", "sub/w.bin"]
    for key, body in blobs.items():
        assert (tmp_path / "out" / key.removeprefix("model/")).read_bytes() == body


def test_missing_bucket_and_prefix_are_clear(s3_env, tmp_path):
    with pytest.raises(UserError, match=r"s3://no-such-bucket-x/m: bucket 'no-such-bucket-x' does not exist at http"):
        download_prefix("s3://no-such-bucket-x/m", tmp_path)


def test_empty_prefix(s3_bucket, tmp_path):
    with pytest.raises(UserError, match="no objects under this prefix"):
        download_prefix(f"s3://{s3_bucket}/nothing", tmp_path)


def test_wrong_credentials_are_clear(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(UserError, match="access denied .*check the S3 credentials"):
        download_prefix(f"s3://{s3_bucket}/model", tmp_path)


def test_multipart_objects_are_verified_by_their_sha256_metadata(s3_bucket, tmp_path):
    """Multipart uploads carry a composite S3 checksum; the registry's `sha256` metadata is checked instead."""
    import hashlib

    from boto3.s3.transfer import TransferConfig

    body = bytes(range(256)) * 40_000  # ~10 MiB: 2 parts of 5 MiB
    src = tmp_path / "w.bin"
    src.write_bytes(body)
    s3 = client()
    multipart = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    s3.upload_file(str(src), s3_bucket, "good/w.bin", Config=multipart,
                   ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": hashlib.sha256(body).hexdigest()}})
    s3.upload_file(str(src), s3_bucket, "bad/w.bin", Config=multipart,
                   ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": "0" * 64}})
    assert "-" in s3.head_object(Bucket=s3_bucket, Key="good/w.bin", ChecksumMode="ENABLED")["ChecksumSHA256"]
    (got,) = download_prefix(f"s3://{s3_bucket}/good", tmp_path / "good")
    assert got.read_bytes() == body
    with pytest.raises(UserError, match=r"bad/w.bin: sha256 mismatch after download"):
        download_prefix(f"s3://{s3_bucket}/bad", tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*"))  # nothing half-downloaded is left visible
