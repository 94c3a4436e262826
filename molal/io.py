"""Atomic, versioned, checksummed artifact files.

Every persisted artifact in molal goes through :func:`atomic_write_bytes`: the bytes are written to a
temporary file in the same directory, fsynced, and renamed over the target, so a reader never sees a
half-written file (a crash leaves either the old file or the new one). :func:`write_artifact` adds a
sidecar ``<path>.sha256`` so :func:`verify_artifact` can refuse a corrupted file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Files molal creates are readable by the owner only (models and caches may hold private data).
FILE_MODE = 0o600
DIR_MODE = 0o700


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupted (checksum mismatch) or of an unsupported format version."""


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) with owner-only permissions if missing; return it as a Path."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = FILE_MODE) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename) with permissions ``mode``."""
    target = Path(path)
    ensure_dir(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return target


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[Path], None], mode: int = FILE_MODE) -> Path:
    """Atomically create ``path`` by calling ``writer(tmp_path)`` (for libraries that want a filename)."""
    target = Path(path)
    ensure_dir(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int = FILE_MODE) -> Path:
    """Serialise ``obj`` as UTF-8 JSON and write it atomically."""
    return atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"), mode)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` atomically plus a ``.sha256`` sidecar (written after the data, also atomically)."""
    target = atomic_write_bytes(path, data)
    atomic_write_bytes(str(target) + ".sha256", hashlib.sha256(data).hexdigest().encode())
    return target


def verify_artifact(path: str | os.PathLike[str]) -> bytes:
    """Read an artifact written by :func:`write_artifact`, checking its checksum; raise ArtifactError."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"artifact not found: {p}")
    data = p.read_bytes()
    side = Path(str(p) + ".sha256")
    if side.exists():
        want = side.read_text().strip()
        got = hashlib.sha256(data).hexdigest()
        if want != got:
            raise ArtifactError(f"checksum mismatch for {p}: the file is corrupted or half-written")
    return data
