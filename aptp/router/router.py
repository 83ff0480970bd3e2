"""The prompt router f_PR: predictor + architecture codes, routing by OT in training, cosine after.

    z (B, Z) ──predictor──► e (B, D) ──┬─ pruning:   argmax_i Q*(e, A)         (Eq. 7, 20; Sinkhorn)
                                        └─ inference: argmax_i cos(e, a⁽ⁱ⁾)     (Eq. 22; no noise)

Similarity. Eq. 22 compares ``e`` and ``a`` directly, so by default (``similarity="logits"``)
cosines are taken between the raw logits — the same cosines feed Sinkhorn (as in SwAV, whose
scores are cosines of normalised features), so training-time assignment and inference routing
use one geometry. ``similarity="gates"`` compares the noise-free gates ``sigmoid(·/γ)`` instead;
``similarity="centred"`` compares logits with each vector's mean over its D entries removed
(Pearson correlation): every logit starts at the same keep-all offset (+3), which makes the raw
cosines of fresh codes and embeddings all ≈ 0.9999, so the offset, not the architecture, dominates
the geometry; centring leaves only the differences between units.
Routing never adds noise, so a prompt's expert is a pure function of the prompt — unlike the
official implementation, which applied Gumbel noise (with a fixed seed) at inference.

Run-directory files (DESIGN.md §2): ``router/config.json``, ``router/predictor.safetensors``
and ``codes.safetensors`` (the code logits, tensor ``logits`` (N, D)).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from aptp.errors import ModelNotFoundError, SettingsError
from aptp.io import atomic_save_file, atomic_write_json
from aptp.router.codes import ArchitectureCodes, gumbel_sigmoid
from aptp.router.predictor import DEFAULT_INIT_BIAS, ArchitecturePredictor
from aptp.router.sinkhorn import AllReduce, sinkhorn

if TYPE_CHECKING:
    from aptp.router.encoder import PromptEncoder
    from aptp.settings import RouterSettings

logger = logging.getLogger(__name__)

__all__ = [
    "CODES_FILE",
    "CONFIG_FILE",
    "PREDICTOR_FILE",
    "ROUTER_DIR",
    "SIMILARITIES",
    "PromptRouter",
    "load_router",
    "save_router",
]

Similarity = Literal["logits", "gates", "centred"]
SIMILARITIES = ("logits", "gates", "centred")
ROUTER_DIR = "router"
CONFIG_FILE = "config.json"
PREDICTOR_FILE = "predictor.safetensors"
CODES_FILE = "codes.safetensors"
_FORMAT = 1


class PromptRouter(nn.Module):
    """Architecture predictor and N architecture codes; routes prompt embeddings to experts.

    The prompt encoder is held as a plain attribute (``router.encoder``), never as parameters:
    it is frozen and its identity (name, id) is saved in the config instead.

    Args:
        z_dim: prompt-embedding size (the encoder's ``dim``).
        arch_dim: D, the length of an architecture vector.
        num_codes: N, the number of experts.
        temperature: Gumbel-sigmoid temperature γ (paper: 0.4).
        similarity: ``"logits"`` (Eq. 22 as written) or ``"gates"``; see the module note.
        init_bias: initial logit of every unit (``predictor.DEFAULT_INIT_BIAS``).
        encoder: the :class:`~aptp.router.encoder.PromptEncoder` producing z (optional; its
            name and id are recorded).
        generator: RNG for the initialisation of predictor and codes.
    """

    def __init__(self, z_dim: int, arch_dim: int, num_codes: int, temperature: float = 0.4,
                 similarity: Similarity = "logits", init_bias: float = DEFAULT_INIT_BIAS,
                 encoder: PromptEncoder | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.similarity_space: Similarity = similarity
        self.init_bias = float(init_bias)
        self.predictor = ArchitecturePredictor(z_dim, arch_dim, init_bias=init_bias, generator=generator)
        self.codes = ArchitectureCodes(num_codes, arch_dim, init_bias=init_bias, generator=generator)
        self.encoder_name: str | None = None
        self.encoder_id: str | None = None
        self.encoder: PromptEncoder | None = None
        if encoder is not None:
            self.attach_encoder(encoder)

    @classmethod
    def from_settings(cls, settings: RouterSettings, encoder: PromptEncoder, arch_dim: int,
                      generator: torch.Generator | None = None) -> PromptRouter:
        """Build from ``settings.router`` (experts, γ, similarity) for ``encoder`` and a space of size ``arch_dim``."""
        return cls(encoder.dim, arch_dim, settings.num_experts, temperature=settings.gumbel_temperature,
                   similarity=settings.similarity, encoder=encoder, generator=generator)

    # ------------------------------------------------------------------ properties
    @property
    def z_dim(self) -> int:
        return self.predictor.z_dim

    @property
    def arch_dim(self) -> int:
        return self.predictor.arch_dim

    @property
    def num_codes(self) -> int:
        return self.codes.num_codes

    def attach_encoder(self, encoder: PromptEncoder) -> None:
        """Use ``encoder`` for :meth:`route_prompts`; it must be the encoder the router was built for."""
        if self.encoder_id is not None and encoder.id != self.encoder_id:
            raise SettingsError(
                f"the router was trained with prompt encoder {self.encoder_name!r} (id {self.encoder_id}), "
                f"got {encoder.name!r} (id {encoder.id}); pass the same --prompt-encoder"
            )
        self.encoder = encoder
        self.encoder_name = encoder.name
        self.encoder_id = encoder.id

    # ------------------------------------------------------------------ forward pieces
    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None,
                hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's differentiable outputs: ``(e, code_gates)``.

        ``e`` (B, D) are the architecture logits of the prompts (Eq. 4) and ``code_gates``
        (N, D) the codes' Gumbel-sigmoid vectors (Eq. 9, noise only in training mode). Going
        through ``forward`` lets a DDP wrapper see every parameter used in the step.
        """
        return self.embed(z), self.code_vectors(generator=generator, hard=hard)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) prompt embeddings → (B, D) architecture logits e (Eq. 4)."""
        return self.predictor(z)

    def soft_vectors(self, e: torch.Tensor, generator: torch.Generator | None = None, hard: bool = False,
                     training: bool | None = None) -> torch.Tensor:
        """e′ = Gumbel-sigmoid(e) (Eq. 12): the warm-up masks and the contrastive loss's input."""
        training = self.training if training is None else training
        return gumbel_sigmoid(e, self.temperature, generator=generator, hard=hard, training=training)

    def code_vectors(self, generator: torch.Generator | None = None, hard: bool = False,
                     training: bool | None = None) -> torch.Tensor:
        """(N, D) Gumbel-sigmoid gates of the codes (Eq. 9); noise only in training."""
        return self.codes(self.temperature, generator=generator, hard=hard, training=training)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors whose cosines route: ``x`` itself, its noise-free gates, or ``x`` centred."""
        if self.similarity_space == "gates":
            return torch.sigmoid(x / self.temperature)
        if self.similarity_space == "centred":
            return x - x.mean(dim=-1, keepdim=True)
        return x

    def similarity(self, e: torch.Tensor) -> torch.Tensor:
        """(B, N) cosine similarity of each embedding to each code, in float64 (no gradient
        needed by the router; computed row-wise, so a row never depends on the others)."""
        fe = F.normalize(self.features(e.detach().to(torch.float64)), dim=-1)
        fa = F.normalize(self.features(self.codes.logits.detach().to(torch.float64)), dim=-1)
        return fe @ fa.T

    def cosines(self, e: torch.Tensor) -> torch.Tensor:
        """(B, N) the cosines of :meth:`similarity`, differentiable in ``e`` and in the codes
        (the input of the assignment-consistency loss)."""
        fe = F.normalize(self.features(e), dim=-1)
        fa = F.normalize(self.features(self.codes.logits.to(e.dtype)), dim=-1)
        return fe @ fa.T

    # ------------------------------------------------------------------ routing
    @torch.no_grad()
    def assign_train(self, e: torch.Tensor, optimal_transport: bool = True, epsilon: float = 0.05,
                     iterations: int = 3, all_reduce: AllReduce | None = None) -> torch.Tensor:
        """Code index of each sample during pruning.

        With ``optimal_transport``: ``argmax`` of the Sinkhorn assignment Q* over the (global)
        batch (Eq. 7, 20), balancing the codes; ``all_reduce`` makes the split batch of several
        processes behave as one batch. Without: the nearest code by cosine (the ablation that
        collapses, §3.2.2).

        Returns:
            (B,) long tensor on ``e.device``.
        """
        sim = self.similarity(e)  # (B, N)
        if optimal_transport:
            q = sinkhorn(sim, epsilon=epsilon, iterations=iterations, all_reduce=all_reduce)
            return q.argmax(dim=1).to(e.device)
        return sim.argmax(dim=1).to(e.device)

    @torch.no_grad()
    def route(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference routing (Eq. 22): the code most cosine-similar to e, without any noise.

        Computed in float64 row by row, so a prompt's expert does not depend on the rest of the
        batch or its position in it (up to float rounding of the linear layer, ~1e-16).

        Returns:
            ``(index, cosine)``: (B,) long expert indices and (B,) float64 similarities.
        """
        w = self.predictor.linear.weight.detach().to(torch.float64)
        b = self.predictor.linear.bias.detach().to(torch.float64)
        if z.shape[-1] != self.z_dim:
            raise ValueError(f"prompt embeddings have {z.shape[-1]} features, the router expects {self.z_dim}")
        e = z.detach().to(device=w.device, dtype=torch.float64) @ w.T + b  # (B, D)
        sim = self.similarity(e)
        best, index = sim.max(dim=1)
        return index, best

    @torch.no_grad()
    def route_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`route` of the attached encoder's (cached) embeddings of ``prompts``."""
        if self.encoder is None:
            raise RuntimeError("no prompt encoder attached; call attach_encoder() or route(z)")
        return self.route(self.encoder.encode(prompts))

    @torch.no_grad()
    def init_codes(self, e: torch.Tensor, generator: torch.Generator | None = None,
                   noise_std: float = 0.0) -> torch.Tensor:
        """End of warm-up: set the codes to N k-means++ picks among embeddings ``e`` (M, D),
        spread in this router's similarity space. Returns the picked row indices."""
        e = e.detach()
        return self.codes.init_from(e, generator=generator, noise_std=noise_std,
                                    features=self.features(e.to(torch.float64)))

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """(N, D) binary expert architectures (no noise)."""
        return self.codes.hard_vectors()

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        """JSON-safe description sufficient to rebuild the module (weights excluded)."""
        return {
            "format": _FORMAT,
            "encoder": {"name": self.encoder_name, "id": self.encoder_id},
            "z_dim": self.z_dim,
            "arch_dim": self.arch_dim,
            "num_codes": self.num_codes,
            "temperature": self.temperature,
            "similarity": self.similarity_space,
            "init_bias": self.init_bias,
        }


def save_router(router: PromptRouter, directory: str | os.PathLike[str]) -> Path:
    """Write ``router/config.json``, ``router/predictor.safetensors`` and ``codes.safetensors``
    into the run directory ``directory`` (each atomically). Returns ``directory/router``."""
    root = Path(directory)
    sub = root / ROUTER_DIR
    predictor = {k: v.detach().cpu().contiguous() for k, v in router.predictor.state_dict().items()}
    meta = {"encoder_id": str(router.encoder_id)}
    atomic_save_file(predictor, sub / PREDICTOR_FILE, metadata=meta)
    atomic_save_file({"logits": router.codes.logits.detach().cpu().contiguous()}, root / CODES_FILE,
                     metadata=meta)
    atomic_write_json(sub / CONFIG_FILE, router.config())  # written last: a complete router has it
    return sub


def load_router(directory: str | os.PathLike[str], encoder: PromptEncoder | None = None,
                device: str | torch.device = "cpu") -> PromptRouter:
    """Rebuild the router saved by :func:`save_router` in the run directory ``directory``.

    Args:
        directory: run directory (holding ``router/`` and ``codes.safetensors``).
        encoder: attach this encoder; its id must match the saved one.
        device: where the parameters go.

    Raises:
        ModelNotFoundError: files missing.
        DamagedFileError: a file is unreadable (truncated, not JSON, wrong tensors); the message
            names the file and the command that writes it again.
        SettingsError: ``encoder`` differs from the encoder the router was trained with.
    """
    from aptp.rundir import damaged, read_json, read_safetensors

    root = Path(directory).expanduser()
    cfg_path = root / ROUTER_DIR / CONFIG_FILE
    paths = [cfg_path, root / ROUTER_DIR / PREDICTOR_FILE, root / CODES_FILE]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"no saved router in {root}: missing {', '.join(missing)}; "
                                 "is it the output directory of `aptp prune`?")
    cfg = read_json(cfg_path)
    try:
        router = PromptRouter(int(cfg["z_dim"]), int(cfg["arch_dim"]), int(cfg["num_codes"]),
                              temperature=float(cfg["temperature"]), similarity=cfg.get("similarity", "logits"),
                              init_bias=float(cfg.get("init_bias", DEFAULT_INIT_BIAS)))
    except (ValueError, KeyError, TypeError) as exc:
        raise damaged(cfg_path, exc) from None
    for path, module, key in [(paths[1], router.predictor, None), (paths[2], router.codes, "logits")]:
        tensors = read_safetensors(path)
        try:
            module.load_state_dict({key: tensors[key]} if key else tensors)
        except (KeyError, RuntimeError) as exc:  # missing / unexpected / wrongly shaped tensors
            raise damaged(path, f"{type(exc).__name__}: tensors do not match {cfg_path.name}: "
                                f"{' '.join(str(exc).split())[:120]}") from None
    enc = cfg.get("encoder") or {}
    router.encoder_name, router.encoder_id = enc.get("name"), enc.get("id")
    if encoder is not None:
        router.attach_encoder(encoder)
    return router.to(device).eval()
