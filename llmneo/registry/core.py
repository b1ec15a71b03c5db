"""The model registry, the same on every store: versions, manifests, aliases with history, pull.

Layout under the registry root (a folder or ``s3://bucket/prefix``)::

    <name>/v<N>/<files…>                 the model folder, file by file
    <name>/v<N>/.claim                   version N is taken (conditional create; first writer wins)
    <name>/v<N>/manifest.json            written last, conditionally: the version exists from here on
    <name>/_aliases/<alias>/<seq>.json   alias events (seq 1, 2, …: conditional create); the highest
                                         seq is where the alias points now, all of them its history

Readers only see versions with a manifest, so an interrupted registration leaves nothing visible
(its number stays claimed and is skipped). Concurrent registrations of one name claim different
numbers. Registering content identical to an existing version (same files, same sha256) returns
that version. References: ``NAME`` (newest version), ``NAME:v3`` (or ``NAME:3``), ``NAME@production``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

from llmneo.config import REGISTRY_NAME
from llmneo.errors import UserError
from llmneo.storage import safe_path, sha256_file

MANIFEST = "manifest.json"
CLAIM = ".claim"
ALIASES = "_aliases"
SCHEMA = "llmneo.registry/v1"
NAME_RE = REGISTRY_NAME  # the configuration checks registry.name with the same rule when it loads
VERSION_RE = re.compile(r"^v?(\d+)$")
REF_RE = re.compile(r"^(?P<name>[^:@\s]+)(?::(?P<version>[^:@\s]+)|@(?P<alias>[^:@\s]+))?$")
# files at the root of a model folder that belong to the registry, not to the model
RESERVED = {MANIFEST, CLAIM}


# --------------------------------------------------------------------------------------------
# Content: checksums, manifests, lineage helpers
# --------------------------------------------------------------------------------------------


def file_entries(model_dir: Path) -> list[dict]:
    """sha256 and size of every file under ``model_dir`` (sorted relative paths).

    A ``manifest.json`` at the root is the registry's own (``pull`` writes it) and not content, so a
    pulled folder re-registers as the same version.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a folder")
    _refuse_escaping_links(model_dir)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    entries = [{"path": p.relative_to(model_dir).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size}
               for p in files]
    entries = [e for e in entries if e["path"] not in RESERVED]
    if not entries:
        raise UserError(f"{model_dir}: no files to register")
    return entries


def _refuse_escaping_links(model_dir: Path) -> None:
    """A symbolic link in a model folder that points outside it would upload whatever it points at
    (another user's key, /etc/…): refuse it, naming the link."""
    root = model_dir.resolve()
    for folder, dirs, files in os.walk(model_dir):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise UserError(f"{model_dir}: {path.relative_to(model_dir).as_posix()} is a symbolic link to "
                                f"{os.readlink(path)}, outside the model folder; copy the file in instead")


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


def check_file(path: Path, entry: dict, label: str = "") -> None:
    """Raise UserError naming the file when it is missing or its size/sha256 differ from ``entry``."""
    where = f"{label}: " if label else ""
    if not path.is_file():
        raise UserError(f"{where}{entry['path']}: missing")
    if path.stat().st_size != entry["size"]:
        raise UserError(f"{where}{entry['path']}: sha256 mismatch (size {path.stat().st_size}, the manifest "
                        f"says {entry['size']}: corrupted or modified)")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise UserError(f"{where}{entry['path']}: sha256 mismatch (expected {entry['sha256'][:16]}…, got "
                        f"{digest[:16]}…: corrupted or modified)")


def verify(directory: Path, manifest: dict) -> None:
    """Check every file of ``manifest`` in ``directory``; raise UserError naming the first bad one."""
    for entry in manifest["files"]:
        check_file(Path(directory) / entry["path"], entry)


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME`` / ``NAME:VERSION`` / ``NAME@ALIAS`` → (name, "vN" or None, alias or None)."""
    m = REF_RE.match(ref.strip())
    if not m or not NAME_RE.match(m["name"]):
        raise UserError(f"{ref!r}: expected NAME, NAME:VERSION or NAME@ALIAS (e.g. smollm2-neo@production)")
    version = None
    if m["version"] is not None:
        vm = VERSION_RE.match(m["version"])
        if not vm:
            raise UserError(f"{ref!r}: version must look like v3 or 3")
        version = f"v{int(vm.group(1))}"
    return m["name"], version, m["alias"]


def _check_name(name: str, what: str = "registry.name") -> None:
    if not NAME_RE.match(name or ""):
        raise UserError(f"{what}: {name!r} must match {NAME_RE.pattern}")


def _check_alias(alias: str) -> None:
    if not NAME_RE.match(alias or "") or VERSION_RE.match(alias):
        raise UserError(f"alias {alias!r}: must match {NAME_RE.pattern} and not look like a version")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


class Registry:
    """Registry operations on any :class:`llmneo.storage.Store` (a folder, S3, …)."""

    def __init__(self, store):
        self.store = store
        # one line per damaged object met while reading (a corrupted manifest, a garbage alias event):
        # listings skip the entry and go on, the CLI prints these lines on stderr
        self.problems: list[str] = []

    @property
    def uri(self) -> str:
        return self.store.uri

    def _flag(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    # ------------------------------------------------------------------ reading
    def _scan(self, name: str) -> tuple[set[int], list[str], dict[str, list[int]]]:
        """One listing of ``<name>/``: (claimed numbers, complete versions sorted, alias → event seqs)."""
        claimed, complete, events = set(), [], {}
        for key in self.store.list(f"{name}/"):
            parts = key.split("/")
            if len(parts) == 3 and VERSION_RE.match(parts[1]) and parts[1].startswith("v"):
                n = int(parts[1][1:])
                if parts[2] == CLAIM:
                    claimed.add(n)
                elif parts[2] == MANIFEST:
                    complete.append(n)
            elif len(parts) == 4 and parts[1] == ALIASES and parts[3].endswith(".json") and parts[3][:-5].isdigit():
                events.setdefault(parts[2], []).append(int(parts[3][:-5]))
        self._flag_links()
        return claimed | set(complete), [f"v{n}" for n in sorted(complete)], \
            {a: sorted(s) for a, s in sorted(events.items())}

    def _flag_links(self) -> None:
        """One problem line per symbolic link a local listing skipped (planted in a shared folder)."""
        for link in sorted(getattr(self.store, "links", ())):
            self._flag(f"registry {self.uri}: {link} is a symbolic link (skipped; remove it)")

    def names(self) -> list[str]:
        """Model names with at least one complete version."""
        names = [n for n in self.store.children("") if NAME_RE.match(n) and self.versions(n)]
        self._flag_links()
        return names

    def _no_model(self, name: str) -> UserError:
        """"no model named X", with the closest registered name (or the names, when none is close)."""
        import difflib

        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = (f" (did you mean {close[0]}?)" if close else f" (models: {', '.join(names[:10])}"
                f"{', …' if len(names) > 10 else ''})" if names else "")
        return UserError(f"registry {self.uri}: no model named {name!r}{hint}")

    def versions(self, name: str) -> list[str]:
        """Complete versions of ``name``, oldest first (``["v1", "v2", …]``)."""
        _check_name(name, "model name")
        return self._scan(name)[1]

    def manifest(self, name: str, version: str) -> dict:
        """The manifest of ``name:version``; a one-line UserError when it is missing or damaged."""
        data = self.store.get_bytes(f"{name}/{version}/{MANIFEST}")
        if data is None:
            known = self.versions(name)
            raise UserError(f"registry {self.uri}: {name}:{version} not found"
                            + (f" (versions: {', '.join(known)})" if known else f"; no model named {name!r}"))
        try:
            manifest = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            manifest, problem = None, f"not JSON ({str(e).splitlines()[0][:80]})"
        else:
            problem = _manifest_problem(manifest, name, version)
        if problem:
            raise UserError(f"registry {self.uri}: {name}:{version}: damaged {MANIFEST}: {problem}")
        return manifest

    def _manifest_or_none(self, name: str, version: str) -> dict | None:
        """:meth:`manifest`, or None (and a flagged problem) when it is damaged."""
        try:
            return self.manifest(name, version)
        except UserError as e:
            self._flag(f"{e} (skipped)")
            return None

    def _event(self, name: str, alias: str, seq: int) -> dict | None:
        """One alias event, or None (flagged) when it is missing or damaged."""
        key = f"{name}/{ALIASES}/{alias}/{seq:08d}.json"
        data = self.store.get_bytes(key)
        try:
            event = json.loads(data) if data is not None else None
        except (ValueError, UnicodeDecodeError):
            event = None
        if not (isinstance(event, dict) and isinstance(event.get("version"), str)
                and VERSION_RE.match(event["version"]) and event.get("alias", alias) == alias):
            self._flag(f"registry {self.uri}: {name}@{alias}: damaged alias event {seq} ({key}; skipped)")
            return None
        return {**event, "alias": alias, "seq": seq}

    def _current(self, name: str, alias: str, seqs: list[int]) -> dict | None:
        """The newest readable event of ``alias`` (damaged newer ones are flagged and skipped)."""
        for seq in reversed(seqs):
            event = self._event(name, alias, seq)
            if event is not None:
                return event
        return None

    def aliases(self, name: str) -> dict[str, str]:
        """alias → version it points at now."""
        current = {alias: self._current(name, alias, seqs) for alias, seqs in self._scan(name)[2].items()}
        return {alias: e["version"] for alias, e in current.items() if e is not None}

    def alias_history(self, name: str, alias: str | None = None) -> list[dict]:
        """Every alias move (oldest first): {alias, version, previous, seq, time, by}."""
        events = self._scan(name)[2]
        if alias is not None:
            if alias not in events:
                raise UserError(f"registry {self.uri}: {name} has no alias {alias!r}"
                                + (f" (aliases: {', '.join(events)})" if events else ""))
            events = {alias: events[alias]}
        history = [e for a, seqs in events.items() for s in seqs if (e := self._event(name, a, s)) is not None]
        return sorted(history, key=lambda e: (str(e.get("time", "")), e["alias"], e["seq"]))

    def resolve(self, ref: str) -> tuple[str, str]:
        """A reference → (name, version) of a complete version."""
        name, version, alias = parse_ref(ref)
        _, versions, events = self._scan(name)
        if not versions:
            raise self._no_model(name)
        if alias is not None:
            if alias not in events:
                raise UserError(f"registry {self.uri}: {name} has no alias {alias!r}"
                                + (f" (aliases: {', '.join(events)})" if events else ""))
            event = self._current(name, alias, events[alias])
            if event is None:
                raise UserError(f"registry {self.uri}: {name}@{alias}: every event of this alias is damaged; "
                                f"promote a version to it again")
            return name, event["version"]
        if version is None:
            return name, versions[-1]
        if version not in versions:
            raise UserError(f"registry {self.uri}: {name}:{version} not found (versions: {', '.join(versions)})")
        return name, version

    def show(self, ref: str) -> dict:
        """The manifest of a reference, with ``aliases`` (those pointing at it now) added."""
        name, version = self.resolve(ref)
        manifest = self.manifest(name, version)
        manifest["aliases"] = sorted(a for a, v in self.aliases(name).items() if v == version)
        return manifest

    def lineage(self, ref: str) -> dict:
        manifest = self.show(ref)
        return {"name": manifest["name"], "version": manifest["version"], "created": manifest["created"],
                "uri": manifest["uri"], "content_digest": manifest["content_digest"],
                **(manifest.get("lineage") or {}), "metrics": manifest.get("metrics") or {}}

    # ------------------------------------------------------------------ writing
    def register(self, name: str, model_dir: str | Path, lineage: dict | None = None,
                 metrics: dict | None = None, aliases: list[str] | tuple[str, ...] = ()) -> dict:
        """Upload a model folder as the next version of ``name`` (or return the identical one).

        Returns the manifest (``reused: True`` when identical content was already registered).
        """
        _check_name(name)
        for alias in aliases:
            _check_alias(alias)
        model_dir = Path(model_dir)
        entries = file_entries(model_dir)
        digest = content_digest(entries)
        claimed, complete, _ = self._scan(name)
        for version in reversed(complete):
            manifest = self._manifest_or_none(name, version)
            if manifest is not None and manifest.get("content_digest") == digest:
                self._point(name, version, aliases)
                return {**manifest, "reused": True}
        n = max(claimed, default=0) + 1
        claim = {"token": uuid.uuid4().hex, "by": _who(), "pid": os.getpid(), "time": _now(),
                 "content_digest": digest}
        while not self.store.create(f"{name}/v{n}/{CLAIM}", _dumps(claim)):
            n += 1  # a concurrent registration took it
        version = f"v{n}"
        total = sum(e["size"] for e in entries)
        from tqdm import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"upload {name}:{version}",
                  disable=None) as bar:
            for e in entries:
                self.store.put_file(f"{name}/{version}/{e['path']}", model_dir / e["path"], e["sha256"], bar.update)
        manifest = {"schema": SCHEMA, "name": name, "version": version, "created": _now(),
                    "uri": self.store.url(f"{name}/{version}"), "files": entries, "size": total,
                    "content_digest": digest, "lineage": lineage or {}, "metrics": metrics or {}}
        if not self.store.create(f"{name}/{version}/{MANIFEST}", _dumps(manifest)):
            raise UserError(f"registry {self.uri}: {name}:{version} was completed by someone else")
        self._point(name, version, aliases)
        return manifest

    def promote(self, ref: str, alias: str) -> dict:
        """Point ``alias`` at ``NAME:VERSION`` (or at whatever another reference resolves to).

        When the alias already points there nothing is written (no history row) and the current
        event is returned with ``unchanged: True``.
        """
        name, version = self.resolve(ref)
        _check_alias(alias)
        seqs = self._scan(name)[2].get(alias, [])
        current = self._current(name, alias, seqs) if seqs else None
        if current is not None and current["version"] == version:
            return {**current, "unchanged": True}
        return self._move(name, version, alias)

    def _point(self, name: str, version: str, aliases) -> None:
        current = self.aliases(name) if aliases else {}
        for alias in aliases:
            if current.get(alias) != version:
                self._move(name, version, alias)

    def _move(self, name: str, version: str, alias: str) -> dict:
        seqs = self._scan(name)[2].get(alias, [])
        seq = (seqs[-1] if seqs else 0) + 1
        while True:
            before = self._current(name, alias, list(range(1, seq))) if seq > 1 else None
            event = {"alias": alias, "version": version, "previous": before["version"] if before else None,
                     "seq": seq, "time": _now(), "by": _who()}
            if self.store.create(f"{name}/{ALIASES}/{alias}/{seq:08d}.json", _dumps(event)):
                return event
            seq += 1  # a concurrent move: go after it

    # ------------------------------------------------------------------ pulling
    def pull(self, ref: str, dest: str | Path) -> dict:
        """Download a version into ``dest`` (new or empty), checking every file's size and sha256.

        Every manifest path is checked first (:func:`llmneo.storage.safe_path`: no absolute path, no
        ``..``, nothing outside ``dest``) — a forged manifest is refused before anything is written.
        Files land in a hidden sibling folder and ``dest`` appears only once all of them verified; a
        mismatch raises a UserError naming the file and leaves ``dest`` untouched. ``manifest.json``
        is written next to the model files.
        """
        name, version = self.resolve(ref)
        manifest = self.manifest(name, version)
        dest = Path(dest).expanduser()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UserError(f"{dest}: exists and is not an empty folder; pull into a new folder")
        tmp = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
        targets = [safe_path(e["path"], tmp, f"registry {self.uri}: {name}:{version}: {MANIFEST}")
                   for e in manifest["files"]]
        dest.parent.mkdir(parents=True, exist_ok=True)
        from tqdm import tqdm

        try:
            with tqdm(total=manifest.get("size") or sum(e["size"] for e in manifest["files"]), unit="B",
                      unit_scale=True, unit_divisor=1024, desc=f"pull {name}:{version}", disable=None) as bar:
                for e, target in zip(manifest["files"], targets, strict=True):
                    self.store.get_file(f"{name}/{version}/{e['path']}", target, bar.update)
                    check_file(target, e, f"{name}:{version}")
            (tmp / MANIFEST).write_bytes(_dumps(manifest))
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    # ------------------------------------------------------------------ tables
    def model_rows(self) -> tuple[list[str], list[list]]:
        """One row per model (its newest readable version); damaged manifests are flagged and skipped."""
        rows = []
        for name in self.names():
            versions = self.versions(name)
            latest = next((m for v in reversed(versions) if (m := self._manifest_or_none(name, v))), None)
            aliases = self.aliases(name)
            rows.append([name, len(versions), latest["version"] if latest else "-",
                         latest["created"] if latest else "-",
                         ", ".join(f"{a}→{v}" for a, v in aliases.items()) or "-"])
        return ["name", "versions", "newest", "created", "aliases"], rows

    def version_rows(self, name: str) -> tuple[list[str], list[list]]:
        """One row per version of ``name``; damaged manifests are flagged and skipped."""
        versions = self.versions(name)
        if not versions:
            raise self._no_model(name)
        aliases = self.aliases(name)
        rows = []
        for version in versions:
            m = self._manifest_or_none(name, version)
            if m is None:
                continue
            metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
            lineage = m.get("lineage") if isinstance(m.get("lineage"), dict) else {}
            forced = " (forced)" if lineage.get("forced") else ""  # registered with --force: the gate failed
            rows.append([version + forced, m["created"], _size(m.get("size") or sum(f["size"] for f in m["files"])),
                         len(m["files"]), ", ".join(a for a, v in aliases.items() if v == version) or "-",
                         metrics.get("kl_to_teacher"), metrics.get("top1_agreement"),
                         metrics.get("llmneo_mc/acc"), lineage.get("pipeline_run_id") or "-"])
        return ["version", "created", "size", "files", "aliases", "kl_to_teacher", "top1_agreement",
                "llmneo_mc/acc", "run"], rows


_REQUIRED = {"name": str, "version": str, "created": str, "uri": str, "content_digest": str, "files": list}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _manifest_problem(m, name: str, version: str) -> str | None:
    """Why a manifest read from the store cannot be used, or None when it can."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        return f"missing {', '.join(missing)}"
    wrong = [k for k, t in _REQUIRED.items() if not isinstance(m[k], t)]
    if wrong:
        return f"wrong type for {', '.join(wrong)}"
    if (m["name"], m["version"]) != (name, version):
        return f"it says {m['name']}:{m['version']}"
    for i, f in enumerate(m["files"]):
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)
                and _HEX64.match(f["sha256"]) and isinstance(f.get("size"), int) and f["size"] >= 0):
            return f"files[{i}] is not a {{path, sha256, size}} entry"
    for k in ("size",):
        if k in m and not isinstance(m[k], int):
            return f"wrong type for {k}"
    for k in ("lineage", "metrics"):
        if m.get(k) is not None and not isinstance(m[k], dict):
            return f"wrong type for {k}"
    return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
