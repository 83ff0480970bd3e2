"""The run directory: the contract between commands (DESIGN.md §2).

``aptp prune`` writes ``settings.yaml``, ``arch_space.json``, ``metrics.jsonl``, ``router/``,
``codes.safetensors``, ``routing.json`` and ``checkpoints/``. ``aptp materialize`` adds
``experts/expert-K/`` and ``experts.json``; ``aptp route --data`` adds ``routes/<split>/``;
``aptp finetune`` adds ``finetuned/expert-K/`` (same format as ``experts/``). This module reads
them back, with one clear error when something is missing.

A file that exists but can not be read (truncated, not JSON, the wrong structure) is a
:class:`DamagedFileError`: one line naming the file and the command that writes it again
(:func:`rebuild_hint`). The loaders of the other modules (router, experts, checkpoints) use
:func:`read_json` / :func:`read_safetensors` / :func:`damaged` from here.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from aptp.engine.space import ArchSpace
from aptp.errors import AptpUserError
from aptp.settings import SETTINGS_FILE, Settings, load_settings

EXPERTS_DIR = "experts"
FINETUNED_DIR = "finetuned"
EXPERTS_FILE = "experts.json"
ROUTES_DIR = "routes"
ROUTING_FILE = "routing.json"
ARCH_SPACE_FILE = "arch_space.json"
CHECKPOINTS_DIR = "checkpoints"
FINETUNE_WORK_DIR = "finetune"


class DamagedFileError(AptpUserError):
    """A file exists but can not be read; the message names it and the command that rebuilds it."""


def find_run_root(path: str | os.PathLike[str]) -> Path | None:
    """The run directory holding ``path`` (the nearest folder above it with settings.yaml), or None.

    ``finetune/expert-K/`` holds a settings.yaml of its own (the fine-tuning settings); it belongs
    to the run above it.
    """
    path = Path(path).expanduser()
    for folder in [path, *path.parents] if path.is_dir() else path.parents:
        if folder.parent.name == FINETUNE_WORK_DIR and folder.name.startswith("expert-"):
            continue
        if (folder / SETTINGS_FILE).is_file():
            return folder
    return None


def _expert_number(name: str) -> str:
    return name.split("-", 1)[1] if name.startswith("expert-") else "K"


def rebuild_hint(path: str | os.PathLike[str]) -> str:
    """What to run so that the file ``path`` of a run directory is written again (one clause)."""
    path = Path(path).expanduser()
    root = find_run_root(path)
    if root is None:
        return "write it again with the command that made it"
    parts = path.relative_to(root).parts
    prune = f"aptp prune --recipe {root / SETTINGS_FILE} --output {root} --resume"
    if not parts or parts[0] == SETTINGS_FILE:
        return "it is the run's record of its settings: restore it from a copy, or start a new run"
    head = parts[0]
    if head == CHECKPOINTS_DIR and len(parts) > 1:
        return f"delete {root / head / parts[1]} and rerun {prune} (it continues from the checkpoint before)"
    if head == FINETUNE_WORK_DIR and len(parts) > 3 and parts[2] == CHECKPOINTS_DIR:
        k = _expert_number(parts[1])
        return (f"delete {root.joinpath(*parts[:4])} and rerun aptp finetune {root} --expert {k} --resume "
                "(it continues from the checkpoint before)")
    if head in (FINETUNED_DIR, FINETUNE_WORK_DIR) and len(parts) > 1:
        return f"rerun aptp finetune {root} --expert {_expert_number(parts[1])} --overwrite"
    if head in (EXPERTS_DIR, EXPERTS_FILE):
        return f"rerun aptp materialize {root} --overwrite"
    if head == ROUTES_DIR and len(parts) > 1:
        return f"rerun aptp route {root} --data --split {parts[1]} --overwrite"
    return f"rerun {prune}"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 100:
        text = text[:97] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def damaged(path: str | os.PathLike[str], exc: BaseException | str, hint: str | None = None) -> DamagedFileError:
    """The one-line error for an unreadable file: ``PATH is damaged (why); <how to rebuild it>``."""
    why = exc if isinstance(exc, str) else _reason(exc)
    return DamagedFileError(f"{path} is damaged ({why}); {hint or rebuild_hint(path)}")


def read_json(path: str | os.PathLike[str], expect: type = dict) -> Any:
    """Parse a JSON file of a run directory; anything unreadable is a :class:`DamagedFileError`.

    Args:
        path: The file (must exist; a missing file stays the caller's own error).
        expect: The type the top-level value must have.
    """
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise damaged(path, exc) from None
    if not isinstance(value, expect):
        raise damaged(path, f"expected a JSON {expect.__name__}, found {type(value).__name__}")
    return value


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """Load a safetensors file; a truncated or corrupt one is a :class:`DamagedFileError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise damaged(path, exc) from None


class RunDir:
    """Read access to a run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not (self.path / "settings.yaml").is_file():
            raise AptpUserError(f"{self.path}: not a run directory of `aptp prune` (no settings.yaml)")

    @cached_property
    def settings(self) -> Settings:
        return load_settings(self.path)

    @cached_property
    def space(self) -> ArchSpace:
        p = self.path / "arch_space.json"
        if not p.is_file():
            raise AptpUserError(f"{self.path}: arch_space.json is missing; was `aptp prune` interrupted?")
        try:
            return ArchSpace.from_dict(read_json(p))
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(p, exc) from None

    def router(self, encoder=None):
        """The trained router, with its prompt encoder attached (embeddings cached on disk)."""
        from aptp.router.encoder import PromptEncoder
        from aptp.router.router import load_router
        from aptp.train.prune import default_embedding_cache

        if not (self.path / "router" / "config.json").is_file():
            raise AptpUserError(f"{self.path}: no trained router yet; finish `aptp prune` first "
                                f"(resume with `aptp prune --recipe {self.path / SETTINGS_FILE} --output {self.path} --resume`)")
        s = self.settings
        if encoder is None:
            encoder = PromptEncoder(s.router.prompt_encoder, cache_dir=s.router.embedding_cache or default_embedding_cache())
        return load_router(self.path, encoder=encoder)

    @property
    def experts_json(self) -> Path:
        return self.path / EXPERTS_FILE

    def experts(self) -> list[dict]:
        """The per-expert records written by ``aptp materialize``."""
        if not self.experts_json.is_file():
            raise AptpUserError(f"{self.path}: no experts yet; run `aptp materialize {self.path}` first")
        records = read_json(self.experts_json).get("experts")
        if not isinstance(records, list) or not all(isinstance(r, dict) and "expert" in r for r in records):
            raise damaged(self.experts_json, "no list of expert records under 'experts'")
        return records

    def routing(self) -> dict:
        """The validation routing report written at the end of ``aptp prune`` (``routing.json``)."""
        p = self.path / ROUTING_FILE
        if not p.is_file():
            raise AptpUserError(f"{self.path}: no {ROUTING_FILE} yet; finish `aptp prune` first "
                                f"(resume with `aptp prune --recipe {p.parent / SETTINGS_FILE} --output {self.path} --resume`)")
        return read_json(p)

    def expert_dir(self, k: int, weights: str = "auto") -> Path:
        """Folder of expert ``k``: ``finetuned`` if present (``auto``), else the materialized one."""
        initial = self.path / EXPERTS_DIR / f"expert-{k}"
        tuned = self.path / FINETUNED_DIR / f"expert-{k}"
        if weights == "finetuned" or (weights == "auto" and (tuned / "model.safetensors").is_file()):
            if not (tuned / "model.safetensors").is_file():
                raise AptpUserError(f"{tuned}: expert {k} has not been fine-tuned; run `aptp finetune {self.path}`")
            return tuned
        if not (initial / "model.safetensors").is_file():
            raise AptpUserError(f"{initial}: expert {k} is missing; run `aptp materialize {self.path}`")
        return initial

    def routes_dir(self, split: str) -> Path:
        return self.path / ROUTES_DIR / split
