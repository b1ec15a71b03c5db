"""Model registry: ``<root>/<name>/<version>/…`` with ``manifest.json`` written last.

A version exists only once its manifest exists (readers ignore folders without one), so an
interrupted registration leaves nothing visible. Versions are claimed with an atomic ``mkdir``, so
concurrent registrations of one name never take the same version. Registering content identical
(same file digests) to an existing version returns that version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from llmneo.errors import UserError

MANIFEST = "manifest.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_entries(model_dir: Path) -> list[dict]:
    """sha256 and size of every file under ``model_dir`` (sorted relative paths)."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return [{"path": p.relative_to(model_dir).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size}
            for p in files]


def content_digest(entries: list[dict]) -> str:
    blob = json.dumps([[e["path"], e["sha256"]] for e in entries], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def git_commit() -> str | None:
    """The code version for lineage: $LLMNEO_GIT_SHA (set in images) or the checkout's HEAD."""
    if os.environ.get("LLMNEO_GIT_SHA"):
        return os.environ["LLMNEO_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def verify(directory: Path, manifest: dict) -> None:
    """Raise UserError naming the first file whose size or sha256 differs from the manifest."""
    for entry in manifest["files"]:
        path = Path(directory) / entry["path"]
        if not path.is_file():
            raise UserError(f"{entry['path']}: missing")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise UserError(f"{entry['path']}: sha256 mismatch (corrupted or modified)")


class LocalRegistry:
    """The embedded default backend: a local folder with the same layout as the S3 one."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _check_name(self, name: str) -> None:
        if not NAME_RE.match(name):
            raise UserError(f"registry.name: {name!r} must match {NAME_RE.pattern}")

    def versions(self, name: str) -> list[str]:
        d = self.root / name
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if p.name.startswith("v") and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda v: int(v[1:]) if v[1:].isdigit() else -1)

    def manifest(self, name: str, version: str) -> dict:
        path = self.root / name / version / MANIFEST
        if not path.is_file():
            raise UserError(f"registry: {name}:{version} not found in {self.root}")
        return json.loads(path.read_text())

    def register(self, name: str, model_dir: str | Path, lineage: dict, metrics: dict) -> dict:
        self._check_name(name)
        model_dir = Path(model_dir)
        entries = file_entries(model_dir)
        digest = content_digest(entries)
        for v in self.versions(name):  # idempotent: identical content → the existing version
            m = self.manifest(name, v)
            if m.get("content_digest") == digest:
                return {**m, "reused": True}
        (self.root / name).mkdir(parents=True, exist_ok=True)
        n = 1 + max([int(p.name[1:]) for p in (self.root / name).iterdir()
                     if p.name[:1] == "v" and p.name[1:].isdigit()] or [0])
        while True:  # claim a version atomically; a concurrent registrar takes the next number
            target = self.root / name / f"v{n}"
            try:
                target.mkdir()
                break
            except FileExistsError:
                n += 1
        for e in entries:
            dst = target / e["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_dir / e["path"], dst)
        manifest = {"name": name, "version": target.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime()),
                    "uri": str(target.resolve()), "files": entries, "content_digest": digest,
                    "lineage": lineage, "metrics": metrics}
        tmp = target / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, target / MANIFEST)  # written last, atomically: the version now exists
        return manifest


def open_registry(uri: str) -> LocalRegistry:
    if uri.startswith("s3://"):
        raise UserError("registry.uri: s3:// registries are not available yet (see README)")
    return LocalRegistry(Path(uri).expanduser())
