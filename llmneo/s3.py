"""S3 access shared by data prep, teacher loading and the registry (boto3).

Endpoint and credentials come from the standard chain only — ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance
roles — never from llmneo configuration files. Settings for S3-compatible stores (MinIO, SeaweedFS,
Ceph): path-style addressing by default (``LLMNEO_S3_ADDRESSING=virtual`` for AWS virtual-hosted
style); botocore's own ``AWS_REQUEST_CHECKSUM_CALCULATION`` / ``AWS_RESPONSE_CHECKSUM_VALIDATION``
apply (set ``when_required`` for stores that reject the default CRC trailers).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from pathlib import Path

from llmneo.errors import UserError


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ("bucket", "some/prefix")."""
    if not uri.startswith("s3://"):
        raise UserError(f"{uri!r}: not an s3:// URI")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise UserError(f"{uri!r}: missing bucket name")
    return bucket, prefix.strip("/")


def client():
    """A boto3 S3 client from the standard environment/profile chain."""
    import boto3
    from botocore.config import Config

    style = os.environ.get("LLMNEO_S3_ADDRESSING", "path")
    cfg = Config(s3={"addressing_style": style}, retries={"max_attempts": 5, "mode": "standard"},
                 connect_timeout=10, read_timeout=120)
    # a new session each time: the default session caches credentials from the first call
    return boto3.session.Session().client("s3", config=cfg)


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


@contextlib.contextmanager
def errors(what: str):
    """Turn botocore failures into one-line :class:`UserError` messages naming ``what``."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise UserError(f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                        f"AWS_PROFILE, or mount the Kubernetes secret)") from None
    except EndpointConnectionError:
        raise UserError(f"{what}: cannot reach S3 endpoint {_endpoint()}") from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            raise UserError(f"{what}: access denied by {_endpoint()} ({code}); check the S3 credentials") from None
        if code == "NoSuchBucket":
            raise UserError(f"{what}: bucket does not exist") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise UserError(f"{what}: not found") from None
        raise UserError(f"{what}: S3 error {code}: {e.response.get('Error', {}).get('Message', '')}") from None


def check_bucket(s3, bucket: str, what: str) -> None:
    """Raise a one-line UserError unless ``bucket`` exists and the credentials may use it.

    Needed before writes: some S3-compatible stores (SeaweedFS) create a missing bucket on the first
    PutObject instead of failing, which would hide a typo in the URI.
    """
    from botocore.exceptions import ClientError

    with errors(what):
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as e:  # HEAD has no error body: only the status code tells what happened
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                raise UserError(f"{what}: bucket {bucket!r} does not exist at {_endpoint()}") from None
            raise


def sha256_b64(path: Path) -> str:
    """SHA-256 of a file, base64 (the form S3's ChecksumSHA256 uses)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return base64.b64encode(h.digest()).decode()


def download_object(s3, bucket: str, key: str, target: Path) -> Path:
    """Download one object to ``target`` via a temporary file, verifying its SHA-256 against the
    store's checksum (single-part uploads) or the ``sha256`` metadata llmneo's registry writes
    (multipart uploads, whose S3 checksum is a composite); renamed into place only when it matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    s3.download_file(bucket, key, str(tmp))
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    expected_b64 = head.get("ChecksumSHA256")
    expected_hex = head.get("Metadata", {}).get("sha256")
    ok = True
    if expected_b64 and "-" not in expected_b64:
        ok = sha256_b64(tmp) == expected_b64
    elif expected_hex:
        ok = base64.b64decode(sha256_b64(tmp)).hex() == expected_hex
    if not ok:
        tmp.unlink()
        raise UserError(f"s3://{bucket}/{key}: sha256 mismatch after download")
    os.replace(tmp, target)
    return target


def download_prefix(uri: str, dest: str | Path) -> list[Path]:
    """Download every object under ``uri`` into ``dest`` (same relative layout), each verified by
    :func:`download_object`; files appear only once complete."""
    bucket, prefix = parse_uri(uri)
    dest = Path(dest)
    s3 = client()
    out = []
    with errors(uri):
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            keys += [o["Key"] for o in page.get("Contents", [])]
        if not keys:
            raise UserError(f"{uri}: no objects under this prefix")
        for key in keys:
            rel = key[len(prefix):].lstrip("/") if prefix else key
            out.append(download_object(s3, bucket, key, dest / rel))
    return out
