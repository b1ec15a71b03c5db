"""Object stores under the registry: a local folder and S3 (boto3), behind one small interface.

Keys are ``/``-separated paths relative to the registry root. What the registry needs from a store:
whole-object writes that become visible atomically (``put_file``, ``put_bytes``), a *conditional
create* that fails when the key exists (``create``: version claims, manifests, alias events), reads,
and listings. Everything else (versions, aliases, verification) is store-independent
(:mod:`llmneo.registry.core`).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from llmneo.errors import UserError

Progress = Callable[[int], object] | None  # called with the number of bytes just transferred
_TMP = ".tmp-"  # local temporary files: invisible to listings


class LocalStore:
    """A folder; atomic visibility through a temporary file + rename, conditional create with link()."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def url(self, key: str) -> str:
        return str((self.root / key).resolve())

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f"{_TMP}{uuid.uuid4().hex[:8]}-{path.name}")

    def create(self, key: str, data: bytes) -> bool:
        path = self.root / key
        tmp = self._tmp(path)
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # atomic, fails if the name exists, and the content is complete
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self.root / key
        tmp = self._tmp(path)
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def put_file(self, key: str, src: Path, sha256: str, progress: Progress = None) -> None:
        """Copy ``src`` (hashing on the way: a file changed since it was hashed is refused)."""
        path = self.root / key
        tmp = self._tmp(path)
        h = hashlib.sha256()
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    h.update(chunk)
                    fout.write(chunk)
                    if progress:
                        progress(len(chunk))
            if h.hexdigest() != sha256:
                raise UserError(f"{src}: changed while being registered (sha256 differs); register again")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def get_file(self, key: str, dest: Path, progress: Progress = None) -> None:
        src = self.root / key
        if not src.is_file():
            raise UserError(f"{self.url(key)}: missing from the registry")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
                if progress:
                    progress(len(chunk))

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith(_TMP))

    def children(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


class S3Store:
    """``s3://bucket/prefix`` through boto3 (llmneo.s3: standard credential chain, path-style).

    Uploads are multipart above ``multipart_threshold_mb`` with a SHA-256 checksum per part, checked
    by the server; the whole file's SHA-256 is also stored as object metadata ``sha256``. Conditional
    create is ``PutObject`` with ``If-None-Match: *`` (AWS S3, SeaweedFS, MinIO, Ceph RGW), read back
    to catch stores that ignore the header.
    """

    def __init__(self, uri: str, multipart_threshold_mb: int = 64, multipart_chunk_mb: int = 64,
                 max_concurrency: int = 8):
        from llmneo.s3 import parse_uri

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_uri(uri)
        self._transfer = (multipart_threshold_mb, multipart_chunk_mb, max_concurrency)
        self._client = None

    @property
    def s3(self):
        """The boto3 client; the first use checks that the bucket exists and is readable."""
        if self._client is None:
            from llmneo.s3 import check_bucket, client

            s3 = client()
            check_bucket(s3, self.bucket, f"registry {self.uri}")
            self._client = s3
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _config(self):
        from boto3.s3.transfer import TransferConfig

        threshold, chunk, concurrency = self._transfer
        return TransferConfig(multipart_threshold=threshold * 2**20, multipart_chunksize=chunk * 2**20,
                              max_concurrency=concurrency)

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        from llmneo.s3 import errors

        s3 = self.s3
        with errors(self.url(key)):
            try:
                s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                              ChecksumAlgorithm="SHA256")
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                        or status in (409, 412):
                    return False
                raise
        return self.get_bytes(key) == data

    def put_bytes(self, key: str, data: bytes) -> None:
        from llmneo.s3 import errors

        s3 = self.s3
        with errors(self.url(key)):
            s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumAlgorithm="SHA256")

    def put_file(self, key: str, src: Path, sha256: str, progress: Progress = None) -> None:
        from llmneo.s3 import errors

        s3 = self.s3
        with errors(self.url(key)):
            s3.upload_file(str(src), self.bucket, self._key(key), Config=self._config(), Callback=progress,
                           ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": sha256}})

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        from llmneo.s3 import errors

        s3 = self.s3
        with errors(self.url(key)):
            try:
                return s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise

    def get_file(self, key: str, dest: Path, progress: Progress = None) -> None:
        from llmneo.s3 import errors

        s3 = self.s3
        dest.parent.mkdir(parents=True, exist_ok=True)
        with errors(self.url(key)):
            s3.download_file(self.bucket, self._key(key), str(dest), Config=self._config(), Callback=progress)

    def list(self, prefix: str) -> list[str]:
        from llmneo.s3 import errors

        s3 = self.s3
        keys = []
        with errors(self.url(prefix)):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                keys += [self._rel(o["Key"]) for o in page.get("Contents", [])]
        return sorted(keys)

    def children(self, prefix: str) -> list[str]:
        from llmneo.s3 import errors

        s3 = self.s3
        base = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        names = []
        with errors(self.url(prefix)):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
                names += [p["Prefix"][len(base):].strip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(n for n in names if n)
