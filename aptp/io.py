"""Small file helpers: atomic writes, output directories and run metadata.

Every write goes to a temporary file in the destination directory, is fsync'ed and then
moved over the destination with :func:`os.replace`, so a reader (or a crash) sees either
the old file or the complete new one, never half a file. On any exception the temporary
file is removed and an existing destination is left untouched.

Heavy imports (torch, safetensors) happen inside the functions that need them so that
``aptp.settings`` and the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from aptp.errors import OutputExistsError, SettingsError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_path",
    "atomic_save_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_yaml",
    "prepare_output_dir",
    "run_metadata",
]

# Distribution names (as pip knows them) reported by run_metadata, keyed by import name.
_PACKAGES: dict[str, str] = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "sentence_transformers": "sentence-transformers",
    "open_clip": "open_clip_torch",
    "safetensors": "safetensors",
    "aptp": "aptp",
}

_umask: int | None = None


def _current_umask() -> int:
    # os.umask can only be read by setting it; do it once and cache the result.
    global _umask
    if _umask is None:
        _umask = os.umask(0o022)
        os.umask(_umask)
    return _umask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Best effort: not every platform/filesystem allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it atomically replaces ``path``.

    Use this for writers that want a file name rather than a file object
    (e.g. ``safetensors.torch.save_file``). Parent directories are created. If the
    ``with`` body raises, the temporary file is removed and ``path`` is untouched.

    Args:
        path: Final destination.

    Yields:
        A path in the same directory as ``path`` (same filesystem, so the rename is atomic).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file 0600; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (parents created). Returns ``Path(path)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` as UTF-8 (no newline translation). Returns ``Path(path)``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON with a trailing newline.

    ``obj`` is serialised before anything touches the disk, so an unserialisable object
    raises ``TypeError`` and leaves no trace.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def atomic_write_yaml(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as block-style YAML, keeping mapping order.

    Uses the safe dumper, so only plain data (dict, list, str, numbers, bool, None) is
    accepted; anything else raises ``yaml.representer.RepresenterError`` before writing.
    """
    text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return atomic_write_text(path, text)


def atomic_save_file(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Atomically save ``tensors`` with ``safetensors.torch.save_file``.

    Args:
        tensors: Name → tensor. safetensors requires contiguous tensors that do not share
            storage; violations raise before ``path`` is touched.
        path: Destination ``.safetensors`` file.
        metadata: Optional string → string header metadata.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _is_protected(path: Path) -> bool:
    # Refuse to wipe "/", the home directory, the working directory or any of their
    # ancestors: a mistyped `--output . --overwrite` must not delete a repository.
    resolved = path.resolve()
    for keep in (Path.cwd().resolve(), Path.home().resolve()):
        if resolved == keep or resolved in keep.parents:
            return True
    return resolved == Path(resolved.anchor)


def prepare_output_dir(path: str | os.PathLike[str], *, overwrite: bool, resume: bool) -> Path:
    """Create or reuse a run directory according to ``--overwrite`` / ``--resume``.

    * ``path`` missing: it is created (with parents); ``resume=True`` is an error, since
      there is nothing to resume.
    * ``path`` an empty directory: used as is.
    * ``path`` a non-empty directory: with neither flag → :class:`OutputExistsError`;
      ``resume=True`` → kept as is, the caller picks up its checkpoints;
      ``overwrite=True`` → its contents are deleted (``shutil.rmtree``) and the directory
      recreated empty. Deleting happens here, before the new run starts, not at the end.
      As a guard, the working directory, the home directory, ``/`` and their ancestors
      are never deleted.

    Args:
        path: The run directory.
        overwrite: Delete an existing non-empty run directory.
        resume: Continue the run stored in an existing directory.

    Returns:
        ``Path(path)`` (``~`` expanded), which exists and is a directory.

    Raises:
        OutputExistsError: Non-empty without a flag, or ``path`` is a file, or a protected
            directory would be overwritten.
        SettingsError: Both flags given, or ``resume`` without an existing directory.
    """
    out = Path(path).expanduser()
    if overwrite and resume:
        raise SettingsError(f"--overwrite and --resume are mutually exclusive (output {out})")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; choose another output path")
    if resume:
        if not out.is_dir():
            raise SettingsError(
                f"--resume given but output directory {out} does not exist; drop --resume to start a new run"
            )
        return out
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"output directory {out} exists and is not empty; pass --overwrite to replace it "
                "or --resume to continue it"
            )
        if _is_protected(out):
            raise OutputExistsError(
                f"refusing to --overwrite {out}: it is the working directory, home directory or "
                "one of their parents; choose a dedicated output directory"
            )
        logger.warning("--overwrite: deleting the contents of %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata() -> dict[str, Any]:
    """Describe the environment of a run, for ``run-meta.json`` and bug reports.

    Package versions come from installed distribution metadata, so nothing heavy is
    imported; a package that is not installed is reported as ``None``.

    Returns:
        JSON-safe dict with ``aptp``, ``timestamp_utc`` (ISO 8601), ``hostname``,
        ``python``, ``platform``, ``argv`` and ``packages`` (import name → version or None).
    """
    packages: Mapping[str, str | None] = {name: _version(dist) for name, dist in _PACKAGES.items()}
    return {
        "aptp": packages["aptp"],
        "timestamp_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "packages": dict(packages),
    }
