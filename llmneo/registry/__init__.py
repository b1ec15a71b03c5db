"""Model registry: a local folder or S3, the same layout on both (see :mod:`llmneo.registry.core`).

    from llmneo.registry import open_registry
    reg = open_registry("s3://models/llmneo")          # or a folder; or open_registry(cfg.registry)
    manifest = reg.register("smollm2-neo", "runs/x/model", lineage, metrics, aliases=["latest"])
    reg.promote("smollm2-neo:v3", "production")
    reg.pull("smollm2-neo@production", "models/prod")   # verifies every sha256
    reg.lineage("smollm2-neo:v3")

The same operations on the command line: ``llmneo registry ls|show|pull|promote|lineage|history``.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmneo.errors import UserError
from llmneo.registry.core import (
    MANIFEST,
    NAME_RE,
    Registry,
    content_digest,
    file_entries,
    git_commit,
    parse_ref,
    sha256_file,
    verify,
)
from llmneo.storage import LocalStore, open_store

ENV_URI = "LLMNEO_REGISTRY"

__all__ = ["MANIFEST", "NAME_RE", "ENV_URI", "Registry", "LocalRegistry",
           "open_registry", "content_digest", "file_entries", "git_commit", "parse_ref", "sha256_file",
           "verify"]


class LocalRegistry(Registry):
    """The embedded default backend: a local folder with the same layout as the S3 one."""

    def __init__(self, root: str | Path):
        super().__init__(LocalStore(root))
        self.root = self.store.root


def open_registry(where) -> Registry:
    """A registry from a URI (``s3://bucket/prefix``, ``file://…`` or a folder) or a RegistryConfig
    (whose S3 transfer settings then apply)."""
    settings = None
    if not isinstance(where, (str, Path)):
        settings, where = where, where.uri
    uri = str(where)
    if not uri:
        raise UserError("registry.uri: empty; give a folder or s3://bucket/prefix")
    store = open_store(uri, label=f"registry {uri.rstrip('/')}")
    if isinstance(store, LocalStore):
        return LocalRegistry(store.root)
    if settings is not None:  # the transfer settings of a RegistryConfig (S3 multipart sizes)
        store = open_store(uri, label=store.label, multipart_threshold_mb=settings.multipart_threshold_mb,
                           multipart_chunk_mb=settings.multipart_chunk_mb, max_concurrency=settings.max_concurrency)
    return Registry(store)


def registry_uri(flag: str | None, config_uri: str | None) -> str:
    """Which registry a lookup uses: ``--registry``, else ``$LLMNEO_REGISTRY``, else ``registry.uri``."""
    return flag or os.environ.get(ENV_URI) or config_uri or "runs/registry"
