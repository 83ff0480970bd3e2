"""Atomic, resumable checkpoints: ``checkpoints/step-NNNNNN/`` directories, the newest few kept.

A checkpoint directory is written under a temporary name and renamed into place, so a crash
(even SIGKILL) leaves either the previous checkpoints or a complete new one, never half of one.
The end of a training step (log, progress, checkpoint, stop on Ctrl-C) is shared by the prune
and fine-tune loops: :func:`stop_on_sigint` and :func:`end_of_step`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
INFO_FILE = "trainer.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / INFO_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], info: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` (torch-serialisable) and ``info`` (JSON) as checkpoint ``step``; prune old ones.

    Returns:
        The checkpoint directory.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / INFO_FILE).write_text(json.dumps({"step": step, **info}, indent=2, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step written again (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # temp dirs of a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, info) of a checkpoint directory.

    Raises:
        DamagedFileError: ``trainer.json`` or ``state.pt`` is missing or unreadable; the message
            names the file and says to delete the checkpoint and resume from the one before.
    """
    import pickle

    from aptp.rundir import damaged, read_json

    path = Path(path)
    info = read_json(path / INFO_FILE)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise damaged(state_path, "missing")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise damaged(state_path, exc) from None
    if not isinstance(state, dict):
        raise damaged(state_path, f"expected a dict of training state, found {type(state).__name__}")
    return state, info


@contextmanager
def stop_on_sigint(install: bool) -> Iterator[dict[str, bool]]:
    """A flag that Ctrl-C sets instead of raising, so the loop ends its step and checkpoints.

    ``install`` is False on the processes that do not own the terminal (ranks > 0): they learn
    of the stop through :func:`end_of_step`'s reduction. The previous handler is restored on exit.
    """
    flag = {"stop": False}
    previous = signal.signal(signal.SIGINT, lambda *_: flag.__setitem__("stop", True)) if install else None
    try:
        yield flag
    finally:
        if install:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def end_of_step(step: int, total: int, record: dict[str, Any], *, main: bool, metrics: Path, log_every: int,
                checkpoint_every: int, checkpoint: Callable[[], Any], stop_requested: Callable[[], bool],
                log: Callable[[dict], None] | None = None,
                progress: Callable[[int, int, dict], None] | None = None) -> bool:
    """Finish training step ``step`` of ``total``; True when the loop must stop (interrupted).

    The main process appends ``record`` to ``metrics`` every ``log_every`` steps and at the
    last, and reports progress. Every process checkpoints every ``checkpoint_every`` steps and
    at the last (``checkpoint`` decides which process writes). ``stop_requested()`` (a
    collective: every process must call it) asks whether any process saw Ctrl-C; then a
    checkpoint of this step is written unless it was just written, and the loop stops.
    """
    if main and (step % log_every == 0 or step == total):
        with open(metrics, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if log is not None:
            log(record)
    if main and progress is not None:
        progress(step, total, record)
    saved = step % checkpoint_every == 0 or step == total
    if saved:
        checkpoint()
    if stop_requested():
        if not saved:
            checkpoint()
        return True
    return False
