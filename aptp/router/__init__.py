"""The prompt router (paper §3.2–3.3): prompt encoder, architecture predictor, codes, routing, losses.

Modules (each one noun): ``encoder`` (frozen sentence-transformer + embedding cache),
``predictor`` (z → e), ``codes`` (N expert logits, Gumbel-sigmoid), ``sinkhorn`` (balanced OT
assignment), ``router`` (routing, save / load), ``losses`` (contrastive, assignment consistency, resource, routed MACs),
``collectives`` (all-reduce / all-gather for multi-process training).

Importing this package is cheap: sentence-transformers loads only when a prompt is encoded.
"""

from aptp.router.codes import ArchitectureCodes, gumbel_sigmoid, kmeanspp_indices, logistic_noise
from aptp.router.collectives import Collective, LocalCollective, TorchCollective, default_collective
from aptp.router.encoder import DEFAULT_ENCODER, PromptEncoder, resolve_encoder
from aptp.router.losses import (
    assignment_loss,
    contrastive_loss,
    global_mean,
    resource_loss,
    routed_mean,
    scale_gradient,
)
from aptp.router.predictor import DEFAULT_INIT_BIAS, ArchitecturePredictor
from aptp.router.router import PromptRouter, load_router, save_router
from aptp.router.sinkhorn import sinkhorn

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_INIT_BIAS",
    "ArchitectureCodes",
    "ArchitecturePredictor",
    "Collective",
    "LocalCollective",
    "PromptEncoder",
    "PromptRouter",
    "TorchCollective",
    "assignment_loss",
    "contrastive_loss",
    "default_collective",
    "global_mean",
    "gumbel_sigmoid",
    "kmeanspp_indices",
    "load_router",
    "logistic_noise",
    "resolve_encoder",
    "resource_loss",
    "routed_mean",
    "save_router",
    "scale_gradient",
    "sinkhorn",
]
