"""What every ``devinterp`` command shares: exit statuses, one-line errors and checks of paths and devices.

Exit statuses: 0 success, 1 problems found (damaged snapshots or files, a live writer, failed
items), 2 usage errors (bad options, paths or factories), 130 interrupted, 141 output pipe closed
(``devinterp snapshots PATH | head``).
"""

from __future__ import annotations

import os
from pathlib import Path

from devinterp.errors import DevinterpError, OutputExistsError, UsageError, exit_status

__all__ = ["exit_status", "one_line", "check_folder_arg", "check_file_arg", "check_accelerator", "check_device"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

ACCELERATORS = ("cpu", "cuda", "gpu", "mps", "auto")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if isinstance(exc, OSError) and not isinstance(exc, DevinterpError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        text = f"{exc.strerror or type(exc).__name__}{where}" if exc.strerror else (text or type(exc).__name__)
    return text or type(exc).__name__


def check_folder_arg(path: str | os.PathLike | None, flag: str) -> None:
    """A local folder argument must not be an existing file (fsspec URLs are left alone)."""
    if path is None or "://" in str(path):
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder: give a folder path")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")


def check_file_arg(path: str | os.PathLike | None, flag: str, *, force: bool = False) -> None:
    """An output file argument must not be a folder, nor (without ``--force``) an existing file."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file: give a file path")
    if p.exists() and not force:
        raise OutputExistsError(f"{flag} {path} exists: pass --force to replace it, or choose another file")


def check_accelerator(accelerator: str, devices: int | str = 1, *, flag: str = "--accelerator") -> None:
    """The accelerator must be known and present on this machine, with enough devices."""
    import torch

    name = str(accelerator).lower()
    if name not in ACCELERATORS:
        raise UsageError(f"{flag} {accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    if name in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {accelerator}: no CUDA device is available on this machine "
                             f"(torch.cuda.is_available() is False); use {flag} cpu")
        count = torch.cuda.device_count()
        if isinstance(devices, int) and devices > count:
            raise UsageError(f"--devices {devices} with {flag} {accelerator}: this machine has {count} CUDA "
                             f"device(s)")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"{flag} mps: no Apple MPS device is available on this machine; use {flag} cpu")


def check_device(device: str | None, flag: str = "--device") -> None:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``) that exists here."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"{flag} {device!r} is not a device (e.g. cpu, cuda, cuda:1, mps)") from exc
    if dev.type == "cuda":
        check_accelerator("cuda", (dev.index or 0) + 1, flag=flag)
    elif dev.type == "mps":
        check_accelerator("mps", flag=flag)
