"""The run directory: the contract between commands (DESIGN.md §2).

``aptp prune`` writes ``settings.yaml``, ``arch_space.json``, ``metrics.jsonl``, ``router/``,
``codes.safetensors``, ``routing.json`` and ``checkpoints/``. ``aptp materialize`` adds
``experts/expert-K/`` and ``experts.json``; ``aptp route --data`` adds ``routes/<split>/``;
``aptp finetune`` adds ``finetuned/expert-K/`` (same format as ``experts/``). This module reads
them back, with one clear error when something is missing.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from aptp.engine.space import ArchSpace
from aptp.errors import AptpUserError
from aptp.settings import Settings, load_settings

EXPERTS_DIR = "experts"
FINETUNED_DIR = "finetuned"
EXPERTS_FILE = "experts.json"
ROUTES_DIR = "routes"


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
        return ArchSpace.load(p)

    def router(self, encoder=None):
        """The trained router, with its prompt encoder attached (embeddings cached on disk)."""
        from aptp.router.encoder import PromptEncoder
        from aptp.router.router import load_router
        from aptp.train.prune import default_embedding_cache

        if not (self.path / "router" / "config.json").is_file():
            raise AptpUserError(f"{self.path}: no trained router yet; finish `aptp prune` first "
                                f"(resume with `aptp prune --output {self.path} --resume`)")
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
        return json.loads(self.experts_json.read_text())["experts"]

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
