"""What every command shares: the settings options, error handling and console output."""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from aptp.errors import AptpUserError
from aptp.settings import Settings, resolve_settings

# Piped or redirected output has no terminal width; rich would then squeeze tables into 80
# columns and cut every cell ("run…"). Give it room unless COLUMNS says otherwise.
_PIPE_WIDTH = 240


def _fit_stdout() -> None:
    """Decide the stdout console's width when a command runs, not when this module is imported
    (a caller, a test runner or a shell wrapper may redirect stdout or set COLUMNS in between)."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    out.width = _PIPE_WIDTH if piped else None  # type: ignore[assignment]  # None: rich measures


# machine-readable output goes to stdout, everything for humans to stderr
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

RecipeOpt = Annotated[
    Optional[Path],
    typer.Option("--recipe", help="Recipe YAML (lowest precedence: recipe < APTP_* env < flags < --set)."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override any setting: --set prune.budget=0.5 (repeatable)."),
]


def settings_from(recipe: Path | None, overrides: list[str] | None, **flags: Any) -> Settings:
    """Resolve the shared settings; ``flags`` are dotted keys (``prune__budget`` → ``prune.budget``)."""
    cli = {k.replace("__", "."): v for k, v in flags.items()}
    return resolve_settings(recipe=recipe, cli=cli, overrides=overrides or ())


def _log_traceback() -> Path:
    log_dir = Path(tempfile.gettempdir()) / "aptp-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"error-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.write_text(" ".join(sys.argv) + "\n\n" + traceback.format_exc())
    return path


def command(fn: Callable) -> Callable:
    """Wrap a command: bad input → one line and exit 2; a bug → exit 1, traceback in a log file."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _fit_stdout()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except AptpUserError as exc:
            err.print(f"error: {' '.join(str(exc).split())}", markup=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            log = _log_traceback()
            err.print(f"aptp: internal error: {type(exc).__name__}: {exc} (traceback in {log})", markup=False)
            raise typer.Exit(1) from None

    return wrapper


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
