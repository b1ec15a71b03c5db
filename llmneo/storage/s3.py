"""``s3://bucket/prefix`` as a :class:`~llmneo.storage.base.Store` (boto3): the only module that speaks S3.

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
import os
import re
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from llmneo.errors import UserError
from llmneo.storage.base import Entry, Progress, sha256_file

_MISSING = ("NoSuchKey", "404", "NotFound")


# S3 bucket naming rules (AWS; MinIO, SeaweedFS and Ceph RGW apply the same): 3-63 characters of
# lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit, no "..",
# not an IP address. Checked before any network call: a bad name otherwise surfaces as an endpoint
# or signature error from botocore that does not say what is wrong.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def parse_uri(uri: str, label: str | None = None) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ("bucket", "some/prefix"); a malformed URI or bucket name is a
    one-line :class:`UserError` naming ``label`` (default: the URI)."""
    what = label or repr(uri)
    if not uri.startswith("s3://"):
        raise UserError(f"{what}: not an s3:// URI")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise UserError(f"{what}: missing bucket name (expected s3://bucket/prefix)")
    if not _BUCKET.match(bucket) or ".." in bucket or _IP.match(bucket):
        raise UserError(f"{what}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, "
                        f"dots or hyphens, starting and ending with a letter or digit)")
    return bucket, prefix.strip("/")


# In a Kubernetes pod, S3 credentials must come from the pod's own settings: the Secret llmneo-s3 as env
# (optional in the pipeline: a missing Secret gives no variables), a web identity (EKS IRSA), EKS Pod
# Identity, or a mounted profile. Without them botocore's chain (botocore/credentials.py
# create_credential_resolver: env, ..., container provider, InstanceMetadataProvider) ends at the
# node's instance role — some other principal's rights — or at no credentials, deep into the step.
POD_CREDENTIAL_ENV = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), ("AWS_WEB_IDENTITY_TOKEN_FILE",),
                      ("AWS_CONTAINER_CREDENTIALS_FULL_URI",), ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",),
                      ("AWS_PROFILE",), ("AWS_SHARED_CREDENTIALS_FILE",))


def check_pod_credentials(what: str, env: dict | None = None) -> None:
    """Inside a Kubernetes pod (``KUBERNETES_SERVICE_HOST`` is set in every pod), refuse in one line to
    use S3 without credentials of the pod's own (:data:`POD_CREDENTIAL_ENV`)."""
    env = os.environ if env is None else env
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return
    if any(all(env.get(k) for k in keys) for keys in POD_CREDENTIAL_ENV):
        return
    raise UserError(f"{what}: no S3 credentials in this pod: the Secret llmneo-s3 (keys AWS_ACCESS_KEY_ID, "
                    f"AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) is missing in this namespace or lacks the keys "
                    f"(create it with `kubectl create secret generic llmneo-s3 ...`, docs/pipeline.md)")


def client():
    """A boto3 S3 client from the standard environment/profile chain."""
    style = os.environ.get("LLMNEO_S3_ADDRESSING", "path")
    cfg = Config(s3={"addressing_style": style}, retries={"max_attempts": 5, "mode": "standard"},
                 connect_timeout=10, read_timeout=120)
    # a new session each time: the default session caches credentials from the first call
    return boto3.session.Session().client("s3", config=cfg)


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _code(e: ClientError) -> str:
    return e.response.get("Error", {}).get("Code", "")


def _status(e: ClientError):
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


@contextlib.contextmanager
def errors(what: str):
    """Turn botocore failures into one-line :class:`UserError` messages naming ``what``."""
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise UserError(f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                        f"AWS_PROFILE, or mount the Kubernetes secret)") from None
    except EndpointConnectionError:
        raise UserError(f"{what}: cannot reach S3 endpoint {_endpoint()}") from None
    except ClientError as e:
        code = _code(e)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            raise UserError(f"{what}: access denied by {_endpoint()} ({code}); check the S3 credentials") from None
        if code == "NoSuchBucket":
            raise UserError(f"{what}: bucket does not exist") from None
        if code in _MISSING:
            raise UserError(f"{what}: not found") from None
        raise UserError(f"{what}: S3 error {code}: {e.response.get('Error', {}).get('Message', '')}") from None


def check_bucket(s3, bucket: str, what: str) -> None:
    """Raise a one-line UserError unless ``bucket`` exists and the credentials may use it.

    Needed before writes: some S3-compatible stores (SeaweedFS) create a missing bucket on the first
    PutObject instead of failing, which would hide a typo in the URI.
    """
    with errors(what):
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as e:  # HEAD has no error body: only the status code tells what happened
            if _status(e) == 404 or _code(e) in ("404", "NoSuchBucket", "NotFound"):
                raise UserError(f"{what}: bucket {bucket!r} does not exist at {_endpoint()}") from None
            raise


def _sha256_b64(path: Path) -> str:
    """SHA-256 of a file, base64 (the form S3's ChecksumSHA256 uses)."""
    return base64.b64encode(bytes.fromhex(sha256_file(path))).decode()


class S3Store:
    """``s3://bucket/prefix`` through boto3 (standard credential chain, path-style addressing).

    Uploads are multipart above ``multipart_threshold_mb`` with a SHA-256 checksum per part, checked
    by the server; the whole file's SHA-256 is also stored as object metadata ``sha256``, which
    :meth:`get_file` verifies (multipart objects only carry a composite checksum). Conditional create
    is ``PutObject`` with ``If-None-Match: *`` (AWS S3, SeaweedFS, MinIO, Ceph RGW), read back to catch
    stores that ignore the header. The first use checks that the bucket exists and is usable.
    """

    def __init__(self, uri: str, label: str | None = None, multipart_threshold_mb: int = 64,
                 multipart_chunk_mb: int = 64, max_concurrency: int = 8):
        self.bucket, self.prefix = parse_uri(uri, label)
        self.uri = uri.rstrip("/")
        self.label = label or self.uri
        self._transfer = (multipart_threshold_mb, multipart_chunk_mb, max_concurrency)
        self._client = None

    @property
    def s3(self):
        """The boto3 client; the first use checks that the bucket exists and is readable."""
        if self._client is None:
            check_pod_credentials(self.label)
            s3 = client()
            check_bucket(s3, self.bucket, self.label)
            self._client = s3
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _config(self) -> TransferConfig:
        threshold, chunk, concurrency = self._transfer
        return TransferConfig(multipart_threshold=threshold * 2**20, multipart_chunksize=chunk * 2**20,
                              max_concurrency=concurrency)

    def create(self, key: str, data: bytes) -> bool:
        s3 = self.s3
        with errors(self.url(key)):
            try:
                s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                              ChecksumAlgorithm="SHA256")
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict") or _status(e) in (409, 412):
                    return False
                raise
        return self.get_bytes(key) == data

    def put_bytes(self, key: str, data: bytes) -> None:
        s3 = self.s3
        with errors(self.url(key)):
            s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumAlgorithm="SHA256")

    def put_file(self, key: str, src: Path, sha256: str | None = None, progress: Progress = None) -> None:
        s3 = self.s3
        sha256 = sha256 or sha256_file(src)  # kept as metadata: the only whole-file digest of a multipart object
        with errors(self.url(key)):
            s3.upload_file(str(src), self.bucket, self._key(key), Config=self._config(), Callback=progress,
                           ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": sha256}})

    def get_bytes(self, key: str) -> bytes | None:
        s3 = self.s3
        with errors(self.url(key)):
            try:
                return s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as e:
                if _code(e) in _MISSING:
                    return None
                raise

    def get_file(self, key: str, dest: Path, progress: Progress = None) -> Path:
        """Download via a temporary file, verifying its SHA-256 against the store's checksum
        (single-part uploads) or the ``sha256`` metadata :meth:`put_file` writes (multipart uploads,
        whose S3 checksum is a composite); renamed into place only when it matches."""
        s3 = self.s3
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            with errors(self.url(key)):
                s3.download_file(self.bucket, self._key(key), str(tmp), Config=self._config(), Callback=progress)
                head = s3.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
            expected_b64 = head.get("ChecksumSHA256")
            expected_hex = head.get("Metadata", {}).get("sha256")
            ok = True
            if expected_b64 and "-" not in expected_b64:
                ok = _sha256_b64(tmp) == expected_b64
            elif expected_hex:
                ok = sha256_file(tmp) == expected_hex
            if not ok:
                raise UserError(f"{self.url(key)}: sha256 mismatch after download")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def entries(self, prefix: str = "") -> list[Entry]:
        s3 = self.s3
        out = []
        with errors(self.url(prefix)):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                out += [Entry(self._rel(o["Key"]), o["Size"], o.get("ETag", "")) for o in page.get("Contents", [])]
        return sorted(out)

    def list(self, prefix: str = "") -> list[str]:
        return [e.key for e in self.entries(prefix)]

    def children(self, prefix: str = "") -> list[str]:
        s3 = self.s3
        base = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        names = []
        with errors(self.url(prefix)):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
                names += [p["Prefix"][len(base):].strip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(n for n in names if n)

    def delete_prefix(self, prefix: str = "") -> int:
        s3 = self.s3
        n = 0
        with errors(self.url(prefix)):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    n += len(keys)
        return n


BACKEND = S3Store
