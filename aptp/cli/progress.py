"""Progress for long runs: a rich bar, or JSON lines for batch jobs, or nothing (``--quiet``)."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from aptp.cli.common import err


class LogFormat(str, Enum):
    text = "text"
    json = "json"


def _fmt(rec: dict[str, Any]) -> str:
    parts = []
    for key, label in (("loss", "loss"), ("loss_ddpm", "ddpm"), ("loss_distill_block", "blk"),
                       ("loss_resource", "res"), ("loss_contrastive", "cont"), ("macs_ratio", "MACs")):
        if key in rec:
            parts.append(f"{label} {rec[key]:.3g}")
    if "busiest_share" in rec:
        parts.append(f"busiest {rec['busiest_share']:.0%}")
    if "phase" in rec:
        parts.append(str(rec["phase"]))
    return "  ".join(parts)


class TrainProgress:
    """Context manager with ``update(step, total, record)`` and ``log(record)`` callbacks."""

    def __init__(self, what: str, quiet: bool = False, log_format: str = "text"):
        self.what = what
        self.quiet = quiet
        self.json = log_format == "json"
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "TrainProgress":
        return self

    def _start(self) -> None:
        if not self.quiet and not self.json and self._progress is None:
            self._progress = Progress(
                TextColumn(f"[bold]{self.what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.what, total=None, info="")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, step: int, total: int, record: dict[str, Any]) -> None:
        self._start()
        if self._progress is not None:
            self._progress.update(self._task, completed=step, total=total, info=_fmt(record))

    def log(self, record: dict[str, Any]) -> None:
        if self.json and not self.quiet:
            err.file.write(json.dumps({"event": self.what, **record}) + "\n")
            err.file.flush()
