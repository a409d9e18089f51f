"""The snapshot store: weights over training, safe to load, crash-safe, resumable.

This is the only module that knows the on-disk format::

    <root>/
      run.json                                  how to rebuild the model (written at fit start)
      index.jsonl                               append-only log, one JSON record per line
      snapshots/step_000000000000.safetensors   one file per snapshot, zero-padded so names sort
      snapshots/step_000000000001.safetensors
      ...

Index records (one JSON object per line, never rewritten):

- ``{"kind": "snapshot", "step", "file", "bytes", "sha256", "epoch", "samples_seen", "train_loss",
  "wall_time", ...user meta}``: a committed snapshot. A later record for the same step wins.
- ``{"kind": "truncate", "after": S, "wall_time"}``: every snapshot with step > S written *before*
  this record is superseded (a run resumed from a checkpoint at step S writes it).
- ``{"kind": "drop", "step": S, "wall_time"}``: the snapshot at S is superseded (written before a
  step is saved a second time, so that its file can be replaced safely).

Crash safety: the weights go to a temporary file in ``snapshots/``, which is flushed, fsynced and
atomically renamed; the directory is fsynced; only then is the index line appended (flush + fsync).
A kill at any moment therefore leaves either no record (an orphan file, ignored) or a record whose
file is complete. Readers tolerate a torn last index line and ignore temporary and orphan files;
a file that is missing, truncated or fails its checksum raises :class:`CorruptSnapshotError` naming
it, never a silent skip.

Local paths use plain ``os`` calls (so fsync and rename are real); any other fsspec URL
(``memory://``, ``s3://`` with the filesystem installed...) goes through fsspec, with the same
format and ordering but only the durability guarantees of that filesystem.

Tied (shared) tensors: safetensors refuses tensors that share memory, so every name that is the
exact same view of another tensor is stored once and recorded as an alias in the file's metadata;
loading restores the aliases as the same tensor object, so tied models load with ``load_into``.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import hashlib
import json
import math
import operator
import os
import queue
import re
import socket
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from devinterp.errors import (
    CorruptSnapshotError,
    EmptyStoreError,
    InvalidInputError,
    SnapshotNotFoundError,
    StaleLockWarning,
    StateDictMismatchError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
)

__all__ = [
    "FORMAT_VERSION",
    "Snapshot",
    "SnapshotStore",
    "VerifyReport",
    "Problem",
    "BackgroundSaver",
    "LOCK_FILE",
    "LockHolder",
    "RepairReport",
    "WriterLock",
    "snapshot_filename",
    "class_path",
    "jsonable",
    "detached_copy",
]

FORMAT_NAME = "devinterp-snapshots"
FORMAT_VERSION = 1
INDEX_FILE = "index.jsonl"
RUN_FILE = "run.json"
SNAPSHOT_DIR = "snapshots"
_STEP_DIGITS = 12
_NAME_RE = re.compile(rf"^step_(\d{{{_STEP_DIGITS}}})\.safetensors$")
_TMP_MARK = ".tmp-"
_RESERVED = frozenset({"kind", "step", "file", "bytes", "sha256"})
_ALIASES_KEY = "devinterp.aliases"


def snapshot_filename(step: int) -> str:
    """Relative path of the snapshot file for ``step``, e.g. ``snapshots/step_000000012345.safetensors``."""
    return f"{SNAPSHOT_DIR}/step_{int(step):0{_STEP_DIGITS}d}.safetensors"


def class_path(obj: Any) -> str:
    """``package.module:Class`` of a class or of an instance's class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _as_class_path(cls: str | type | None) -> str | None:
    return cls if cls is None or isinstance(cls, str) else class_path(cls)


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of ``value``: containers recurse, scalars pass, tensors/arrays become lists,
    non-finite floats become strings, anything else its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor):
        return jsonable(value.detach().cpu().tolist()) if value.numel() <= 64 else repr(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, type):
        return class_path(value)
    return repr(value)


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Snapshot:
    """The weights of a model at one training step.

    Attributes:
        step: The optimizer step (``trainer.global_step``) at which the weights were taken.
        state_dict: Name -> tensor, as from ``module.state_dict()`` (tied names share one tensor).
        meta: The snapshot's index record (``epoch``, ``samples_seen``, ``train_loss``,
            ``wall_time``, ``file``, ``bytes``, ``sha256`` and any user meta), read-only.
    """

    step: int
    state_dict: dict[str, Tensor] = field(repr=False)
    meta: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Problem:
    """One thing :meth:`SnapshotStore.verify` found wrong, attached to the file it concerns."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`SnapshotStore.verify`.

    Attributes:
        root: The store that was checked.
        checked: Number of snapshot files read and checked.
        problems: What is wrong (missing, truncated or corrupt files, unreadable index/run file).
        notes: Harmless findings (orphan or temporary files left by an interrupted write,
            superseded snapshots still on disk, a torn last index line).
    """

    root: str
    checked: int
    problems: tuple[Problem, ...]
    notes: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def scalars(self) -> dict[str, float]:
        return {"verify/checked": float(self.checked), "verify/problems": float(len(self.problems))}

    def __str__(self) -> str:
        head = f"{self.root}: {self.checked} snapshot(s) checked, {len(self.problems)} problem(s)"
        lines = [head] + [f"  PROBLEM {p}" for p in self.problems] + [f"  note    {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# file systems: local (os, real fsync) and fsspec


class _LocalFS:
    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    def display(self, rel: str = "") -> str:
        return self._p(rel)

    def exists(self, rel: str = "") -> bool:
        return os.path.exists(self._p(rel))

    def isdir(self, rel: str = "") -> bool:
        return os.path.isdir(self._p(rel))

    def makedirs(self, rel: str = "") -> None:
        os.makedirs(self._p(rel), exist_ok=True)

    def read(self, rel: str) -> bytes:
        with open(self._p(rel), "rb") as f:
            return f.read()

    def size(self, rel: str) -> int:
        return os.path.getsize(self._p(rel))

    def listdir(self, rel: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._p(rel)))
        except FileNotFoundError:
            return []

    def _fsync_dir(self, rel_dir: str) -> None:
        try:
            fd = os.open(self._p(rel_dir), os.O_RDONLY)
        except OSError:  # e.g. platforms without directory fds
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._fsync_dir(rel.rpartition("/")[0])

    def append(self, rel: str, data: bytes) -> None:
        with open(self._p(rel), "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def truncate(self, rel: str, length: int) -> None:
        with open(self._p(rel), "r+b") as f:
            f.truncate(length)
            f.flush()
            os.fsync(f.fileno())

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create ``rel`` holding ``data``; FileExistsError if it exists.

        Atomic and never seen half-written: the data go to a temporary file, which is then
        hard-linked to ``rel`` (``link`` fails if ``rel`` exists); where hard links are not
        supported, ``O_CREAT | O_EXCL``.
        """
        path = self._p(rel)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network / FAT filesystems)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.unlink(tmp)
        self._fsync_dir(rel.rpartition("/")[0])

    def remove(self, rel: str) -> None:
        os.unlink(self._p(rel))

    def mtime(self, rel: str) -> float:
        return os.path.getmtime(self._p(rel))

    def take_aside(self, rel: str) -> str | None:
        """Atomically move ``rel`` to a unique name next to it; None if it no longer exists."""
        aside = f"{rel}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self._p(rel), self._p(aside))
        except FileNotFoundError:
            return None
        return aside

    def put_back(self, aside: str, rel: str) -> None:
        """Move ``aside`` back to ``rel`` unless ``rel`` exists again (then drop ``aside``)."""
        try:
            os.link(self._p(aside), self._p(rel))
        except OSError:
            pass
        os.unlink(self._p(aside))


class _FsspecFS:
    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str = "") -> str:
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._p(rel))

    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self._p(rel))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self._p(rel), exist_ok=True)

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._p(rel)))

    def listdir(self, rel: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._p(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def write_atomic(self, rel: str, data: bytes) -> None:
        directory, _, name = rel.rpartition("/")
        tmp = f"{directory}/.{name}{_TMP_MARK}{uuid.uuid4().hex[:8]}" if directory else f".{name}{_TMP_MARK}{uuid.uuid4().hex[:8]}"
        with self.fs.open(self._p(tmp), "wb") as f:
            f.write(data)
        self.fs.mv(self._p(tmp), self._p(rel))

    def append(self, rel: str, data: bytes) -> None:
        try:
            with self.fs.open(self._p(rel), "ab") as f:
                f.write(data)
        except (NotImplementedError, ValueError, OSError):
            old = self.read(rel) if self.exists(rel) else b""
            self.write_atomic(rel, old + data)

    def truncate(self, rel: str, length: int) -> None:
        self.write_atomic(rel, self.read(rel)[:length])

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create ``rel`` with mode ``"xb"`` where the filesystem supports it (local, memory, s3fs
        with conditional writes); elsewhere check-then-write, which is not atomic."""
        try:
            with self.fs.open(self._p(rel), "xb") as f:
                f.write(data)
            return
        except FileExistsError:
            raise
        except (NotImplementedError, ValueError, TypeError):
            pass
        if self.exists(rel):
            raise FileExistsError(self.display(rel))
        with self.fs.open(self._p(rel), "wb") as f:
            f.write(data)

    def remove(self, rel: str) -> None:
        self.fs.rm_file(self._p(rel))

    def mtime(self, rel: str) -> float:
        modified = self.fs.modified(self._p(rel))
        return modified.timestamp()

    def take_aside(self, rel: str) -> str | None:
        aside = f"{rel}{_TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            self.fs.mv(self._p(rel), self._p(aside))
        except FileNotFoundError:
            return None
        return aside

    def put_back(self, aside: str, rel: str) -> None:
        if not self.exists(rel):
            self.fs.mv(self._p(aside), self._p(rel))
        else:
            self.remove(aside)


def _make_fs(root: str | os.PathLike) -> _LocalFS | _FsspecFS:
    if isinstance(root, os.PathLike):
        return _LocalFS(os.fspath(root))
    root = str(root)
    if root.startswith("file://"):
        return _LocalFS(root[len("file://"):])
    if "://" in root:
        return _FsspecFS(root)
    return _LocalFS(root)


# --------------------------------------------------------------------------------------------
# (de)serialisation of state dicts


def _to_safetensors_bytes(state_dict: Mapping[str, Tensor], step: int) -> bytes:
    from safetensors.torch import save

    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise InvalidInputError(
            f"a snapshot holds tensors only; these entries are not tensors: {bad[:10]}"
            + (" ..." if len(bad) > 10 else "")
        )
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    tensors: dict[str, Tensor] = {}
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        if t.numel() > 0 and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            view = (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in views:  # exactly the same tensor under another name: tied weights
                aliases[name] = views[view]
                continue
            views[view] = name
        t = t.cpu().contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:  # a different view of shared memory: store a copy
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            storages.add(ptr)
        tensors[name] = t
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "step": str(int(step))}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    return save(tensors, metadata=metadata)


def _from_safetensors_bytes(data: bytes, where: str) -> dict[str, Tensor]:
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except Exception as exc:  # safetensors raises its own SafetensorError / various
        raise CorruptSnapshotError(f"{where} is not a readable safetensors file ({exc})") from exc
    meta = header.get("__metadata__") or {}
    aliases = json.loads(meta.get(_ALIASES_KEY, "{}"))
    out: dict[str, Tensor] = dict(tensors)
    for alias, target in aliases.items():
        if target not in out:
            raise CorruptSnapshotError(f"{where}: alias {alias!r} points to missing tensor {target!r}")
        out[alias] = out[target]
    return out


def detached_copy(state_dict: Mapping[str, Tensor], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A copy of ``state_dict`` on ``device`` that training can no longer modify.

    Names that are the same view of one tensor (tied weights) stay the same tensor in the copy,
    so the store still records them as aliases.
    """
    out: dict[str, Tensor] = {}
    seen: dict[tuple, Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(t, Tensor):
            out[name] = t
            continue
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and key in seen:
            out[name] = seen[key]
            continue
        copy = t.to(device, copy=True)
        if t.numel() > 0:
            seen[key] = copy
        out[name] = copy
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that matter to read the store back."""
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("devinterp", "lightning", "safetensors", "numpy"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:  # not installed: simply not recorded
            continue
    return out


def _valid_record(rec: Any) -> bool:
    if not isinstance(rec, dict):
        return False
    kind = rec.get("kind")
    if kind == "snapshot":
        return _is_step(rec.get("step")) and isinstance(rec.get("file"), str)
    if kind == "truncate":
        return _is_step(rec.get("after"))
    if kind == "drop":
        return _is_step(rec.get("step"))
    return isinstance(kind, str)  # unknown kinds from newer versions are ignored on purpose


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class _ParsedIndex:
    entries: dict[int, dict[str, Any]]
    records: list[tuple[int, dict[str, Any]]]  # (line number, record) of every valid line
    bad_lines: list[int]  # garbled lines other than a torn last one
    torn_tail: bool


def _parse_index(data: bytes) -> _ParsedIndex:
    """Replay the index log; garbled lines are collected, not raised (callers decide)."""
    entries: dict[int, dict[str, Any]] = {}
    records: list[tuple[int, dict[str, Any]]] = []
    bad: list[int] = []
    torn = False
    lines = data.split(b"\n")
    # The last element is b"" when the file ends with a newline; otherwise it is a torn write.
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not _valid_record(rec):
            if lineno == len(lines):  # torn final line from an interrupted append: never committed
                torn = True
            else:
                bad.append(lineno)
            continue
        records.append((lineno, rec))
        kind = rec["kind"]
        if kind == "snapshot":
            entries[int(rec["step"])] = rec
        elif kind == "truncate":
            for s in [s for s in entries if s > rec["after"]]:
                del entries[s]
        elif kind == "drop":
            entries.pop(rec["step"], None)
    return _ParsedIndex(entries, records, bad, torn)


@dataclass(frozen=True)
class RepairReport:
    """What :meth:`SnapshotStore.repair` did. Nothing is ever deleted.

    Attributes:
        root: The store.
        kept: Steps whose index record and file agree (size and sha256): kept as they were.
        recovered: Steps whose file is a complete snapshot that no readable index line lists
            (its line was garbled): listed again, with the checksum of the file as it is.
        excluded: ``(file, reason)`` of snapshot files left out of the new index (missing,
            truncated, failing their checksum, unreadable); the files stay on disk.
        backup: Where the old index was copied (None when the index was already sound).
        bad_lines: The garbled index lines that were dropped.
    """

    root: str
    kept: tuple[int, ...]
    recovered: tuple[int, ...]
    excluded: tuple[Problem, ...]
    backup: str | None
    bad_lines: tuple[int, ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.root}: index rebuilt: {len(self.kept) + len(self.recovered)} snapshot(s) listed "
                 f"({len(self.kept)} kept, {len(self.recovered)} recovered from their files), "
                 f"{len(self.excluded)} file(s) left out (not deleted)"]
        if self.bad_lines:
            lines.append(f"  garbled index line(s) dropped: {list(self.bad_lines)}")
        if self.backup:
            lines.append(f"  old index kept as {self.backup}")
        lines += [f"  recovered step {s} (meta such as epoch/train_loss was on the lost line)" for s in self.recovered]
        lines += [f"  left out {p}" for p in self.excluded]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the writer lock: one writer per folder


#: The lock file a writer holds in the folder it writes (a store's root, a results folder).
LOCK_FILE = "writer.lock"
_HELD: dict[str, str] = {}  # "<lock file>#<token>" -> token, for the locks this process holds (or is taking)
_HELD_GUARD = threading.Lock()


def _hostname() -> str:
    return socket.gethostname() or "unknown-host"


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (True when that cannot be told)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but not ours, or no way to tell
        return True
    return True


def _process_start(pid: int) -> float | None:
    """Start time (epoch seconds) of process ``pid`` from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return None


def _command_line() -> str:
    argv = [os.path.basename(sys.argv[0])] + sys.argv[1:4] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(argv)[:200]


@dataclass(frozen=True)
class LockHolder:
    """What a lock file records about its writer."""

    pid: int
    host: str
    started: float
    purpose: str = ""
    command: str = ""
    token: str = ""

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        try:
            d = json.loads(data)
            return cls(pid=int(d["pid"]), host=str(d["host"]), started=float(d["started"]),
                       purpose=str(d.get("purpose", "")), command=str(d.get("command", "")),
                       token=str(d.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        what = f", {self.purpose}" if self.purpose else ""
        cmd = f", command `{self.command}`" if self.command else ""
        return f"pid {self.pid} on host {self.host}, since {_iso(self.started)}{what}{cmd}"

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "started": _iso(self.started), "purpose": self.purpose,
                "command": self.command}


class WriterLock:
    """Exclusive writer lock of one folder: the file ``<folder>/writer.lock``.

    The lock file is created atomically (``O_CREAT | O_EXCL`` locally, mode ``"xb"`` on fsspec) and
    holds the writer's pid, host, start time and purpose as JSON. A lock whose holder is gone
    (same host and its pid no longer runs, or runs a process started after the lock was taken)
    is recovered, with a :class:`~devinterp.errors.StaleLockWarning`. A holder on another host
    cannot be checked: its lock stands until it is released or the file is deleted by hand.

    Args:
        fs: The folder's filesystem (from the store).
        what: What is being written, for the messages (``"snapshot store"``, ``"results folder"``).
        purpose: Recorded in the lock file (who holds it and why).
        advice: What the refused writer should do (appended to the error message).
    """

    def __init__(self, fs: _LocalFS | _FsspecFS, *, what: str, purpose: str = "", advice: str = ""):
        self._fs = fs
        self.what = what
        self.purpose = purpose
        self.advice = advice
        self.path = fs.display(LOCK_FILE)
        self.note: str | None = None
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def holder(self) -> LockHolder | None:
        """The current holder recorded in the lock file (None: unlocked or unreadable)."""
        try:
            return LockHolder.parse(self._fs.read(LOCK_FILE))
        except FileNotFoundError:
            return None

    def _stale(self, holder: LockHolder | None, raw: bytes) -> str | None:
        """Why the lock is stale (a note), or None if its holder may be alive."""
        if holder is None:  # never half-written locally; elsewhere give a writer time to finish
            try:
                young = time.time() - self._fs.mtime(LOCK_FILE) < 30.0
            except (OSError, NotImplementedError, AttributeError, TypeError, ValueError):
                young = False
            return None if young else f"unreadable lock file ({len(raw)} bytes) treated as stale"
        if holder.host != _hostname():
            return None
        if holder.pid == os.getpid():
            with _HELD_GUARD:
                if holder.token and holder.token in _HELD.values():
                    return None  # held by a live object of this very process
            return f"lock of an earlier process with this pid ({holder.describe()}) recovered"
        if not _pid_alive(holder.pid):
            return f"stale lock of a process that is gone ({holder.describe()}) recovered"
        start = _process_start(holder.pid)
        if start is not None and start > holder.started + 2.0:
            return f"stale lock ({holder.describe()}): that pid now runs a newer process; recovered"
        return None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`~devinterp.errors.StoreLockedError` naming the holder."""
        if self._token is not None:
            return
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": _hostname(), "started": time.time(), "purpose": self.purpose,
                  "command": _command_line(), "token": token}
        data = (json.dumps(record) + "\n").encode()
        for _attempt in range(8):
            with _HELD_GUARD:  # known as this process's before the file exists (threads racing here)
                _HELD.setdefault(f"{self.path}#{token}", token)
            try:
                self._fs.create_exclusive(LOCK_FILE, data)
            except FileExistsError:
                with _HELD_GUARD:
                    _HELD.pop(f"{self.path}#{token}", None)
            except BaseException:
                with _HELD_GUARD:
                    _HELD.pop(f"{self.path}#{token}", None)
                raise
            else:
                self._token = token
                return
            try:
                raw = self._fs.read(LOCK_FILE)
            except FileNotFoundError:  # released meanwhile: try again
                continue
            holder = LockHolder.parse(raw)
            why = self._stale(holder, raw)
            if why is None:
                raise self._refusal(holder)
            aside = self._fs.take_aside(LOCK_FILE)
            if aside is None:
                continue
            if self._fs.read(aside) == raw:  # still the stale lock we judged: drop it
                self._fs.remove(aside)
                self.note = f"{self.path}: {why}"
                warnings.warn(self.note, StaleLockWarning, stacklevel=3)
            else:  # someone took the lock meanwhile: give it back
                self._fs.put_back(aside, LOCK_FILE)
        holder = self.holder()
        raise self._refusal(holder)

    def _refusal(self, holder: LockHolder | None) -> StoreLockedError:
        who = holder.describe() if holder is not None else "an unknown process"
        same = holder is not None and holder.host == _hostname() and holder.pid == os.getpid()
        if same:
            who += " (this very process: close the earlier writer with .close() first)"
        gone = (f" If that process is gone (one on another host cannot be checked from here), delete "
                f"{self.path}")
        advice = f" {self.advice}" if self.advice else ""
        return StoreLockedError(
            f"{self._fs.display()} is a {self.what} that another writer holds ({who}); one writer at a "
            f"time, so that nothing it wrote is replaced.{advice}{gone}",
            lock_path=self.path, holder=holder.as_dict() if holder is not None else None,
        )

    def release(self) -> None:
        """Give the lock up (only if the lock file is still ours). Idempotent."""
        token, self._token = self._token, None
        if token is None:
            return
        with _HELD_GUARD:
            _HELD.pop(f"{self.path}#{token}", None)
        try:
            holder = LockHolder.parse(self._fs.read(LOCK_FILE))
            if holder is not None and holder.token == token:
                self._fs.remove(LOCK_FILE)
        except (FileNotFoundError, OSError):
            pass


def _release_quietly(lock: WriterLock) -> None:
    try:
        lock.release()
    except Exception:  # at interpreter exit: never raise
        pass


# --------------------------------------------------------------------------------------------
# the store


class SnapshotStore:
    """A folder (local or fsspec URL) of snapshots of one training run.

    Args:
        root: Local path or fsspec URL (``memory://run1``, ``s3://bucket/run1``...).
        mode: ``"r"`` to read an existing store (the default), ``"a"`` to create it if needed and
            append snapshots.

    Raises:
        StoreNotFoundError: In mode ``"r"``, ``root`` does not exist or holds no store.

    Example:
        >>> store = SnapshotStore("runs/x/snapshots")        # doctest: +SKIP
        >>> store.steps()[:3], store.latest().step            # doctest: +SKIP
        >>> store.load_into(model, 100)                       # doctest: +SKIP
    """

    # Class-level defaults, so that views built with ``cls.__new__`` (checkpoint folders) have them.
    _lock: WriterLock | None = None
    _closed: bool = False
    _damaged: tuple[Problem, ...] = ()

    def __init__(self, root: str | os.PathLike, *, mode: str = "r"):
        if mode not in ("r", "a"):
            raise InvalidInputError(f"mode must be 'r' (read) or 'a' (append), got {mode!r}")
        if not isinstance(root, (str, os.PathLike)):
            raise InvalidInputError(f"root must be a path or fsspec URL string, got {type(root).__name__}")
        self.mode = mode
        self._fs = _make_fs(root)
        self.root = self._fs.display()
        self._readonly = mode == "r"
        self._ckpt_files: dict[int, str] | None = None  # set by from_lightning_checkpoints
        self._ckpt_run: dict[str, Any] | None = None
        self._entries: dict[int, dict[str, Any]] = {}
        self._steps: list[int] = []
        self._torn_tail = False
        self._recovered = False
        if mode == "a":
            if self._fs.exists() and not self._fs.isdir():
                raise StoreError(f"{self.root} is a file, not a folder: give SnapshotStore a folder path")
            self._fs.makedirs()
            self._lock = WriterLock(
                self._fs, what="snapshot store", purpose="SnapshotStore(mode='a')",
                advice="Wait for that run to end, or write to another folder (SnapshotCallback(dirpath=...)); "
                       "reading needs no lock.",
            )
            self._lock.acquire()
            # released on close(), when the store is garbage-collected, and at interpreter exit
            self._finalizer = weakref.finalize(self, _release_quietly, self._lock)
            self._fs.makedirs(SNAPSHOT_DIR)
        else:
            if self._fs.exists() and not self._fs.isdir():
                raise StoreNotFoundError(f"{self.root} is a file, not a snapshot store folder")
            if not self._fs.exists():
                raise StoreNotFoundError(f"no snapshot store at {self.root}: the path does not exist")
            if not (self._fs.exists(INDEX_FILE) or self._fs.exists(RUN_FILE)):
                hint = ""
                if any(n.endswith(".ckpt") for n in self._fs.listdir()):
                    hint = (" It holds Lightning .ckpt files: open it with "
                            "SnapshotStore.from_lightning_checkpoints(path) (the CLI does this itself).")
                raise StoreNotFoundError(
                    f"{self.root} holds no snapshot store (no {INDEX_FILE} or {RUN_FILE}).{hint}"
                )
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise

    # ---- the writer lock --------------------------------------------------------------------

    def close(self) -> None:
        """Release the writer lock (mode ``"a"``); later writes raise. Reading keeps working.

        Also done by ``with SnapshotStore(path, mode="a") as store:``, when the store is
        garbage-collected and at normal interpreter exit. Idempotent.
        """
        self._closed = True
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def lock_note(self) -> str | None:
        """The note of a stale writer lock this store recovered when it was opened (else None)."""
        return self._lock.note if self._lock is not None else None

    # ---- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> SnapshotStore:
        """Open ``path`` read-only: a snapshot store, or else a folder of Lightning ``.ckpt`` files."""
        fs = _make_fs(path)
        if not fs.exists():
            raise StoreNotFoundError(f"no snapshot store at {fs.display()}: the path does not exist")
        if not fs.isdir():
            raise StoreNotFoundError(
                f"{fs.display()} is a file, not a folder: give the snapshot store's folder (the one holding "
                f"{INDEX_FILE}) or the folder holding the .ckpt files"
            )
        if fs.exists(INDEX_FILE) or fs.exists(RUN_FILE):
            return cls(path, mode="r")
        if any(n.endswith(".ckpt") for n in fs.listdir()):
            return cls.from_lightning_checkpoints(path)
        if isinstance(fs, _LocalFS):
            from devinterp.hf import is_hf_checkpoint_folder

            if is_hf_checkpoint_folder(fs.display()):
                return cls.from_hf_checkpoints(path)
        raise StoreNotFoundError(
            f"{fs.display()} holds neither a snapshot store ({INDEX_FILE}), Lightning .ckpt files nor "
            "HuggingFace checkpoints (checkpoint-<step>/, step<step>/ with config.json)"
        )

    @classmethod
    def from_hf_checkpoints(cls, path: str | os.PathLike) -> SnapshotStore:
        """A read-only view over a folder of HuggingFace checkpoints (see :mod:`devinterp.hf`).

        The folder holds ``checkpoint-<step>/`` (HF ``Trainer``), ``step<step>/`` or
        ``step-<step>/`` (``save_pretrained`` series, e.g. Pythia's revisions) subfolders, or
        subfolders whose ``trainer_state.json`` gives the step; each with ``config.json`` and
        ``model.safetensors`` (possibly sharded) or ``pytorch_model.bin`` (read with
        ``weights_only``). :meth:`load` gives the weights under the parameter names of the model
        ``transformers`` builds from the config (renamings and tied weights applied);
        :meth:`run_info` names the factory that builds it (:func:`devinterp.hf.causal_lm_from_config`)
        and holds the latest ``config.json`` as ``"hparams"``.

        Raises:
            StoreNotFoundError: ``path`` does not exist or holds no such checkpoint.
        """
        from devinterp.hf import MODEL_FACTORY, find_checkpoints, read_config, weight_bytes

        fs = _make_fs(path)
        if not isinstance(fs, _LocalFS):
            raise StoreNotFoundError(f"{fs.display()}: HuggingFace checkpoint folders are read from local paths")
        found = find_checkpoints(fs.display())
        self = cls._checkpoint_view(fs)
        entries: dict[int, dict[str, Any]] = {}
        for step, folder in sorted(found.items()):
            rel = os.path.relpath(folder, fs.display())
            entries[step] = {"kind": "snapshot", "step": step, "file": rel, "format": "hf",
                             "bytes": weight_bytes(folder)}
            self._ckpt_files[step] = rel
        config = read_config(found[max(found)])
        self._ckpt_run = {
            "format": "hf-checkpoints",
            "model_class": MODEL_FACTORY,
            "hparams": config,
            "versions": {"transformers": config.get("transformers_version")},
        }
        self._entries = entries
        self._steps = sorted(entries)
        return self

    @classmethod
    def _checkpoint_view(cls, fs: Any) -> SnapshotStore:
        """An empty read-only store over a folder of checkpoints (filled by the caller)."""
        self = cls.__new__(cls)
        self.mode = "r"
        self._fs = fs
        self.root = fs.display()
        self._readonly = True
        self._torn_tail = False
        self._recovered = False
        self._ckpt_files = {}
        self._ckpt_run = None
        return self

    @classmethod
    def from_lightning_checkpoints(cls, dirpath: str | os.PathLike) -> SnapshotStore:
        """A read-only view over a folder of ``.ckpt`` files written by Lightning's ``ModelCheckpoint``.

        Each file is read with ``torch.load(weights_only=True)`` (no arbitrary pickle); its step is
        ``global_step`` and its weights are ``state_dict``, whose keys are the LightningModule's (e.g.
        ``model.layer.weight`` if the module holds the network as ``self.model``): nothing is
        stripped, so load them into the same LightningModule class, or strip the prefix yourself.
        Files at the same step (``last.ckpt`` next to ``epoch=..-step=...ckpt``) count once. The
        checkpoint's ``hyper_parameters`` are exposed as :meth:`run_info` ``["hparams"]``.

        Raises:
            StoreNotFoundError: ``dirpath`` does not exist or holds no ``.ckpt`` file.
            CorruptSnapshotError: No ``.ckpt`` file can be read (each is named in the message).
                Single damaged files are left out and listed by :meth:`damaged`.
        """
        fs = _make_fs(dirpath)
        if not fs.exists():
            raise StoreNotFoundError(f"no checkpoint folder at {fs.display()}: the path does not exist")
        if not fs.isdir():
            raise StoreNotFoundError(f"{fs.display()} is a file, not a folder: give the folder holding the .ckpt files")
        names = [n for n in fs.listdir() if n.endswith(".ckpt")]
        if not names:
            raise StoreNotFoundError(f"{fs.display()} holds no Lightning .ckpt files")
        self = cls._checkpoint_view(fs)
        entries: dict[int, dict[str, Any]] = {}
        # "last*.ckpt" duplicates another file's step: prefer the named one.
        damaged: list[Problem] = []
        for name in sorted(names, key=lambda n: (n.startswith("last"), n)):
            try:  # one damaged file must not hide the others: it is listed in damaged()
                ckpt = self._load_ckpt(name)
                step = ckpt.get("global_step")
                if not isinstance(step, int):
                    raise CorruptSnapshotError(f"{fs.display(name)} has no integer 'global_step'")
                if "state_dict" not in ckpt:
                    raise CorruptSnapshotError(f"{fs.display(name)} has no 'state_dict'")
            except CorruptSnapshotError as exc:
                damaged.append(Problem(name, str(exc)))
                continue
            if self._ckpt_run is None and "hyper_parameters" in ckpt:
                self._ckpt_run = {
                    "format": "lightning-checkpoints",
                    "model_class": None,
                    "hparams": jsonable(dict(ckpt["hyper_parameters"])),
                    "hparams_name": ckpt.get("hparams_name"),
                    "versions": {"lightning": ckpt.get("pytorch-lightning_version")},
                }
            if step in entries:
                entries[step].setdefault("also", []).append(name)
                continue
            entries[step] = {
                "kind": "snapshot",
                "step": step,
                "file": name,
                "bytes": fs.size(name),
                "epoch": ckpt.get("epoch"),
            }
            self._ckpt_files[step] = name
        self._entries = entries
        self._steps = sorted(entries)
        self._damaged = tuple(damaged)
        if not entries:
            raise CorruptSnapshotError(
                f"no .ckpt file in {fs.display()} can be read: " + "; ".join(p.message for p in damaged)
            )
        return self

    def _load_ckpt(self, name: str) -> dict[str, Any]:
        where = self._fs.display(name)
        try:
            if isinstance(self._fs, _LocalFS):
                return torch.load(where, map_location="cpu", weights_only=True, mmap=True)
            import io

            return torch.load(io.BytesIO(self._fs.read(name)), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CorruptSnapshotError(
                f"{where} cannot be read as a Lightning checkpoint with weights_only=True ({exc})"
            ) from exc

    # ---- reading the index ------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the index (to see snapshots another process appended since opening).

        Raises:
            CorruptSnapshotError: A line other than the last is garbled; the message names the line
                and the repair (``devinterp verify --repair PATH`` / :meth:`repair`).
        """
        if self._ckpt_files is not None:
            return
        data = self._fs.read(INDEX_FILE) if self._fs.exists(INDEX_FILE) else b""
        parsed = _parse_index(data)
        if parsed.bad_lines:
            first = parsed.bad_lines[0]
            more = f" (and line(s) {parsed.bad_lines[1:]})" if len(parsed.bad_lines) > 1 else ""
            raise CorruptSnapshotError(
                f"{self._fs.display(INDEX_FILE)} line {first}{more} is not a valid index record: the index "
                f"is damaged. Rebuild it from the snapshot files that pass their checksums with "
                f"`devinterp verify --repair {self.root}` (SnapshotStore.repair; no file is deleted)"
            )
        self._torn_tail = parsed.torn_tail
        self._entries = parsed.entries
        self._steps = sorted(parsed.entries)

    # ---- queries ----------------------------------------------------------------------------

    @property
    def readonly(self) -> bool:
        return self._readonly

    def steps(self) -> list[int]:
        """Steps with a snapshot, ascending."""
        return list(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def __contains__(self, step: object) -> bool:
        try:
            return operator.index(step) in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Snapshot]:
        """Snapshots in step order (each loaded when reached)."""
        for step in list(self._steps):
            yield self.load(step)

    def __repr__(self) -> str:
        kind = "store" if self._ckpt_files is None else (self._ckpt_run or {}).get("format", "lightning-checkpoints")
        return f"SnapshotStore({self.root!r}, {kind}, {len(self)} snapshots)"

    def meta(self, step: int) -> Mapping[str, Any]:
        """The index record of the snapshot at ``step``, without loading its weights."""
        return MappingProxyType(dict(self._entry(step)))

    def file_path(self, step: int) -> str:
        """Full path or URL of the snapshot file at ``step``."""
        return self._fs.display(self._entry(step)["file"])

    def _entry(self, step: int) -> dict[str, Any]:
        if not self._steps:
            raise EmptyStoreError(f"the snapshot store at {self.root} holds no snapshot yet")
        if step not in self._entries:
            i = bisect.bisect_left(self._steps, step)
            near = self._steps[max(0, i - 3) : i + 3]
            raise SnapshotNotFoundError(
                f"no snapshot at step {step} in {self.root}; nearby steps: {near} "
                f"({len(self._steps)} snapshots, steps {self._steps[0]}..{self._steps[-1]})"
            )
        return self._entries[step]

    def latest(self) -> Snapshot:
        """The snapshot with the largest step. Raises :class:`EmptyStoreError` if there is none."""
        if not self._steps:
            raise EmptyStoreError(f"the snapshot store at {self.root} holds no snapshot yet")
        return self.load(self._steps[-1])

    def load(self, step: int, *, device: str | torch.device = "cpu") -> Snapshot:
        """Load the snapshot at ``step``, checking its checksum.

        Raises:
            EmptyStoreError: The store holds no snapshot.
            SnapshotNotFoundError: No snapshot at ``step`` (the message lists nearby steps).
            CorruptSnapshotError: The file is missing, truncated or fails its checksum.
        """
        rec = self._entry(step)
        if rec.get("format") == "hf":
            from devinterp.hf import load_checkpoint

            sd = load_checkpoint(self._fs.display(rec["file"]))
        elif self._ckpt_files is not None:
            ckpt = self._load_ckpt(rec["file"])
            sd = {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, Tensor)}
        else:
            data = self._read_checked(rec)
            sd = _from_safetensors_bytes(data, self._fs.display(rec["file"]))
        if torch.device(device).type != "cpu":
            moved: dict[int, Tensor] = {}
            sd = {k: moved.setdefault(id(v), v.to(device)) for k, v in sd.items()}
        return Snapshot(step=int(step), state_dict=sd, meta=MappingProxyType(dict(rec)))

    def _read_checked(self, rec: Mapping[str, Any]) -> bytes:
        where = self._fs.display(rec["file"])
        try:
            data = self._fs.read(rec["file"])
        except FileNotFoundError as exc:
            raise CorruptSnapshotError(
                f"{where} is missing although {INDEX_FILE} lists it (step {rec['step']})"
            ) from exc
        if "bytes" in rec and len(data) != rec["bytes"]:
            raise CorruptSnapshotError(
                f"{where} is truncated or altered: {len(data)} bytes on disk, {rec['bytes']} recorded"
            )
        if "sha256" in rec and _sha256(data) != rec["sha256"]:
            raise CorruptSnapshotError(f"{where} fails its sha256 checksum: the file is corrupt")
        return data

    def load_into(self, model: torch.nn.Module, step: int | None = None, *, strict: bool = True) -> Snapshot:
        """Copy the weights at ``step`` (default: the latest) into ``model``.

        Raises:
            StateDictMismatchError: Keys missing or unexpected (when ``strict``) or shapes differ;
                every mismatch is listed.
        """
        snap = self.latest() if step is None else self.load(step)
        target = model.state_dict()
        missing = sorted(set(target) - set(snap.state_dict))
        unexpected = sorted(set(snap.state_dict) - set(target))
        shapes = sorted(
            f"{k}: snapshot {tuple(snap.state_dict[k].shape)} vs model {tuple(target[k].shape)}"
            for k in set(target) & set(snap.state_dict)
            if tuple(target[k].shape) != tuple(snap.state_dict[k].shape)
        )
        if shapes or (strict and (missing or unexpected)):
            parts = []
            if missing and strict:
                parts.append(f"missing from the snapshot ({len(missing)}): {missing}")
            if unexpected and strict:
                parts.append(f"not in the model ({len(unexpected)}): {unexpected}")
            if shapes:
                parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
            raise StateDictMismatchError(
                f"snapshot at step {snap.step} ({self.file_path(snap.step)}) does not fit "
                f"{type(model).__name__}: " + "; ".join(parts)
            )
        model.load_state_dict(snap.state_dict, strict=strict)
        return snap

    def run_info(self) -> dict[str, Any]:
        """The run file (model class path, hyper-parameters, versions...); ``{}`` if none."""
        if self._ckpt_files is not None:
            return dict(self._ckpt_run or {})
        if not self._fs.exists(RUN_FILE):
            return {}
        try:
            return json.loads(self._fs.read(RUN_FILE))
        except ValueError as exc:
            raise CorruptSnapshotError(f"{self._fs.display(RUN_FILE)} is not valid JSON ({exc})") from exc

    # ---- damage -----------------------------------------------------------------------------

    def damaged(self) -> tuple[Problem, ...]:
        """Items found damaged when the store was opened and left out of :meth:`steps` (a ``.ckpt``
        file of a checkpoint folder that cannot be read); ``()`` for a snapshot store, whose
        damaged files show up when loaded or in :meth:`verify`."""
        return tuple(self._damaged)

    def file_status(self, step: int) -> str | None:
        """A cheap check of the file at ``step`` (no checksum): None if present with its recorded
        size, else ``"missing"`` or ``"truncated (N of M bytes)"``."""
        rec = self._entry(step)
        try:
            size = self._fs.size(rec["file"])
        except (FileNotFoundError, OSError):
            return "missing"
        recorded = rec.get("bytes")
        if self._ckpt_files is None and isinstance(recorded, int) and size != recorded:
            return f"truncated ({size} of {recorded} bytes)" if size < recorded else f"altered ({size} bytes, {recorded} recorded)"
        return None

    @classmethod
    def repair(cls, root: str | os.PathLike) -> RepairReport:
        """Rebuild ``index.jsonl`` from the snapshot files that pass their checksums. Never deletes a file.

        Every snapshot whose record and file agree (size and sha256) is kept with its record (and
        meta). When index lines are garbled, snapshot files that no readable line lists are read
        in full and listed again if they are complete (meta lost with the line). Records whose
        file is missing, truncated or corrupt are left out of the new index (the files stay).
        The old index is kept next to it as ``index.jsonl.damaged-<time>``. Takes the writer lock,
        so it is refused while a run writes the store.

        Raises:
            StoreNotFoundError: ``root`` holds no snapshot store.
            StoreLockedError: A writer holds the store.
        """
        fs = _make_fs(root)
        if not fs.isdir() or not (fs.exists(INDEX_FILE) or fs.isdir(SNAPSHOT_DIR)):
            raise StoreNotFoundError(f"no snapshot store to repair at {fs.display()}")
        lock = WriterLock(fs, what="snapshot store", purpose="SnapshotStore.repair",
                          advice="Repair it once that run has ended.")
        lock.acquire()
        try:
            return cls._repair(fs)
        finally:
            lock.release()

    @staticmethod
    def _repair(fs: _LocalFS | _FsspecFS) -> RepairReport:
        data = fs.read(INDEX_FILE) if fs.exists(INDEX_FILE) else b""
        parsed = _parse_index(data)
        by_file: dict[str, dict[str, Any]] = {}
        for _, rec in parsed.records:
            if rec["kind"] == "snapshot":
                by_file[rec["file"]] = rec
        kept: list[int] = []
        recovered: list[int] = []
        excluded: list[Problem] = []
        records: dict[int, dict[str, Any]] = {}
        for step, rec in sorted(parsed.entries.items()):
            try:
                blob = fs.read(rec["file"])
            except FileNotFoundError:
                excluded.append(Problem(rec["file"], f"missing (step {step})"))
                continue
            if rec.get("bytes") is not None and len(blob) != rec["bytes"]:
                excluded.append(Problem(rec["file"], f"truncated or altered: {len(blob)} bytes, {rec['bytes']} recorded"))
                continue
            if rec.get("sha256") is not None and _sha256(blob) != rec["sha256"]:
                excluded.append(Problem(rec["file"], "fails its sha256 checksum"))
                continue
            kept.append(step)
            records[step] = rec
        listed = {rec["file"] for rec in parsed.entries.values()}
        for name in fs.listdir(SNAPSHOT_DIR):
            m = _NAME_RE.match(name)
            rel = f"{SNAPSHOT_DIR}/{name}"
            if not m or rel in listed or not parsed.bad_lines:
                continue  # without garbled lines, an unlisted file is an orphan or superseded: it stays out
            blob = fs.read(rel)
            old = by_file.get(rel)
            if old is not None and old.get("sha256") == _sha256(blob):
                continue  # the very file a readable record superseded (truncate/drop)
            step = int(m.group(1))
            try:
                _from_safetensors_bytes(blob, fs.display(rel))
                header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
                if (header.get("__metadata__") or {}).get("step") not in (None, str(step)):
                    raise CorruptSnapshotError(f"{fs.display(rel)} holds another step than its name says")
            except (CorruptSnapshotError, ValueError) as exc:
                excluded.append(Problem(rel, f"not listed and not a readable snapshot ({exc})"))
                continue
            records[step] = {"kind": "snapshot", "step": step, "file": rel, "bytes": len(blob),
                             "sha256": _sha256(blob), "epoch": None, "samples_seen": None, "train_loss": None,
                             "wall_time": None, "recovered": True}
            recovered.append(step)
        backup = None
        changed = bool(parsed.bad_lines or excluded or recovered)
        if changed:
            stamp = _dt.datetime.now(tz=_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
            backup_rel = f"{INDEX_FILE}.damaged-{stamp}-{uuid.uuid4().hex[:4]}"
            fs.write_atomic(backup_rel, data)
            backup = fs.display(backup_rel)
            text = "".join(json.dumps(records[s], separators=(",", ":")) + "\n" for s in sorted(records))
            fs.write_atomic(INDEX_FILE, text.encode())
        return RepairReport(fs.display(), tuple(kept), tuple(sorted(recovered)), tuple(excluded), backup,
                            tuple(parsed.bad_lines))

    # ---- verification -----------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Read every live snapshot file and check size, checksum and readability.

        Never raises for a damaged store: every problem is listed by file in the report.
        """
        problems: list[Problem] = []
        notes: list[Problem] = []
        checked = 0
        if self._ckpt_files is None:
            try:
                self.refresh()
            except CorruptSnapshotError as exc:
                return VerifyReport(self.root, 0, (Problem(INDEX_FILE, str(exc)),))
            if self._torn_tail:
                notes.append(Problem(INDEX_FILE, "torn last line (interrupted write, ignored)"))
            try:
                self.run_info()
            except CorruptSnapshotError as exc:
                problems.append(Problem(RUN_FILE, str(exc)))
        problems.extend(self._damaged)
        for step in self._steps:
            rec = self._entries[step]
            checked += 1
            try:
                self.load(step)
            except CorruptSnapshotError as exc:
                problems.append(Problem(rec["file"], str(exc)))
        if self._ckpt_files is None:
            live = {self._entries[s]["file"] for s in self._steps}
            for name in self._fs.listdir(SNAPSHOT_DIR):
                rel = f"{SNAPSHOT_DIR}/{name}"
                if rel in live:
                    continue
                if _TMP_MARK in name:
                    notes.append(Problem(rel, "temporary file from an interrupted write (ignored)"))
                elif _NAME_RE.match(name):
                    notes.append(Problem(rel, "not in the index: orphan or superseded snapshot (ignored)"))
                else:
                    notes.append(Problem(rel, "unknown file (ignored)"))
        return VerifyReport(self.root, checked, tuple(problems), tuple(notes))

    # ---- writing ----------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._readonly:
            raise StoreError(f"{self.root} is open read-only; open it with SnapshotStore(path, mode='a') to write")
        if self._closed:
            raise StoreError(f"{self.root}: this writer was closed (its lock released); open the store again "
                             f"with SnapshotStore(path, mode='a') to write")
        if not self._recovered:
            self._recover()

    def _recover(self) -> None:
        """Before the first append: cut a torn (uncommitted) last index line so later lines parse."""
        self._recovered = True
        if not self._fs.exists(INDEX_FILE):
            return
        data = self._fs.read(INDEX_FILE)
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            complete = isinstance(json.loads(tail), dict)
        except ValueError:
            complete = False
        if complete:  # the record was fully written, only its newline is missing
            self._fs.append(INDEX_FILE, b"\n")
        else:
            self._fs.truncate(INDEX_FILE, cut)
        self.refresh()

    def _append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=False, allow_nan=False, separators=(",", ":")) + "\n"
        self._fs.append(INDEX_FILE, line.encode())

    def save(self, step: int, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
        """Write the snapshot at ``step`` durably, then commit it to the index.

        Args:
            step: Training step (>= 0).
            state_dict: Name -> tensor (any device; tied names are stored once).
            meta: Extra JSON-able fields for the index record, e.g. ``epoch``, ``samples_seen``,
                ``train_loss``, ``wall_time`` (defaults to now). Reserved: kind, step, file,
                bytes, sha256.

        Returns:
            The committed index record.
        """
        self._check_writable()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidInputError(f"step must be a non-negative integer, got {step!r}")
        meta = dict(meta or {})
        clash = sorted(_RESERVED & set(meta))
        if clash:
            raise InvalidInputError(f"meta keys {clash} are reserved by the store; rename them")
        data = _to_safetensors_bytes(state_dict, step)
        rel = snapshot_filename(step)
        if step in self._entries:
            # The old record must stop pointing at the file before the file is replaced.
            self._append({"kind": "drop", "step": step, "wall_time": _now()})
            del self._entries[step]
            self._steps.remove(step)
        self._fs.write_atomic(rel, data)
        record = {"kind": "snapshot", "step": step, "file": rel, "bytes": len(data), "sha256": _sha256(data)}
        record.update({"epoch": None, "samples_seen": None, "train_loss": None, "wall_time": _now()})
        record.update(jsonable(meta))
        self._append(record)
        self._entries[step] = record
        bisect.insort(self._steps, step)
        return MappingProxyType(record)

    def truncate_after(self, step: int) -> list[int]:
        """Supersede every snapshot with a step greater than ``step`` (append-only).

        Used when a run resumes from a checkpoint at ``step``: what the interrupted run wrote later
        is replaced by the resumed run's snapshots. Returns the superseded steps.
        """
        self._check_writable()
        later = [s for s in self._steps if s > step]
        if later:
            self._append({"kind": "truncate", "after": int(step), "wall_time": _now()})
            for s in later:
                del self._entries[s]
            self._steps = [s for s in self._steps if s <= step]
        return later

    def write_run(
        self,
        *,
        model_class: str | type | None = None,
        hparams: Mapping[str, Any] | None = None,
        datamodule_class: str | type | None = None,
        datamodule_hparams: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``run.json`` (atomically). A rewrite (on resume) keeps the original creation time.

        Args:
            model_class: ``package.module:Class`` (or the class itself) that rebuilds the model.
            hparams: The model's hyper-parameters (made JSON-safe).
            datamodule_class: Same for the datamodule, when there is one.
            datamodule_hparams: The datamodule's hyper-parameters.
            extra: Anything else worth keeping (e.g. the snapshot schedule).
        """
        self._check_writable()
        now = _now()
        previous = self.run_info() if self._fs.exists(RUN_FILE) else {}
        info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": previous.get("created", _iso(now)),
            "updated": _iso(now),
            "model_class": _as_class_path(model_class),
            "hparams": jsonable(dict(hparams or {})),
            "datamodule_class": _as_class_path(datamodule_class),
            "datamodule_hparams": jsonable(dict(datamodule_hparams)) if datamodule_hparams is not None else None,
            "versions": library_versions(),
        }
        if extra:
            info.update(jsonable(dict(extra)))
        self._fs.write_atomic(RUN_FILE, (json.dumps(info, indent=2, sort_keys=False) + "\n").encode())
        return info


# --------------------------------------------------------------------------------------------
# background writing


class BackgroundSaver:
    """Writes snapshots to a store from a worker thread, in submission order.

    The caller hands over tensors it will not modify (copies); serialising, hashing and fsync
    happen off the training thread. Pending copies are bounded by bytes, so a slow disk slows
    training down instead of filling memory (one snapshot may always wait, whatever its size).
    An error in the worker is raised on the next :meth:`submit`, :meth:`flush` or :meth:`close`.

    Args:
        store: A store opened with ``mode="a"``.
        max_pending_bytes: Bytes of tensors that may wait in memory before ``submit`` blocks.
    """

    def __init__(self, store: SnapshotStore, *, max_pending_bytes: int = 512 * 2**20):
        if max_pending_bytes < 1:
            raise InvalidInputError(f"max_pending_bytes must be >= 1, got {max_pending_bytes}")
        self.store = store
        self.max_pending_bytes = int(max_pending_bytes)
        self._queue: queue.Queue = queue.Queue()
        self._cv = threading.Condition()
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="devinterp-snapshot-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                step, state_dict, meta, nbytes = item
                try:
                    if self._error is None:
                        self.store.save(step, state_dict, meta)
                finally:
                    with self._cv:
                        self._pending_bytes -= nbytes
                        self._cv.notify_all()
            except BaseException as exc:  # kept and re-raised in the training thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise StoreError(f"writing a snapshot to {self.store.root} failed: {err}") from err

    def submit(self, step: int, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> None:
        """Queue a snapshot; blocks while more than ``max_pending_bytes`` are waiting."""
        self._raise()
        if not self._thread.is_alive():
            raise StoreError("the snapshot writer is closed")
        seen: set[int] = set()
        nbytes = 0
        for t in state_dict.values():
            if isinstance(t, Tensor) and id(t) not in seen:
                seen.add(id(t))
                nbytes += t.numel() * t.element_size()
        with self._cv:
            while self._pending_bytes > 0 and self._pending_bytes + nbytes > self.max_pending_bytes:
                self._cv.wait()
            self._pending_bytes += nbytes
        self._queue.put((step, state_dict, meta, nbytes))

    def flush(self) -> None:
        """Block until every submitted snapshot is committed."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()
