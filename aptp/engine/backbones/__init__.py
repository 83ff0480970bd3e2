"""Backbone adapters: one per family of denoisers, behind one seam (:mod:`.base`).

``backbone_for(model_or_config)`` returns the adapter of a diffusers denoiser (by its class, or a
config's ``_class_name``); the shared engine calls nothing else that knows a block type.
"""

from __future__ import annotations

from aptp.engine.backbones.base import Backbone, UnitCost, UnsupportedModelError, get

_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Register an adapter under every diffusers class name it handles."""
    for cls in backbone.classes:
        _REGISTRY[cls] = backbone
    return backbone


def supported_classes() -> str:
    return ", ".join(sorted(_REGISTRY))


def class_name(model_or_config) -> str | None:
    """The diffusers class name of a model (unwrapping DDP / accelerate) or of a config dict."""
    if isinstance(model_or_config, dict):
        return model_or_config.get("_class_name")
    inner = getattr(model_or_config, "module", model_or_config)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return type(inner).__name__


def backbone_for(model_or_config, name: str | None = None) -> Backbone:
    """The adapter of a model or config.

    A config without ``_class_name`` is taken for a U-Net (bare U-Net configs written by older
    tools omit it).

    Raises:
        UnsupportedModelError: no adapter handles that class (one line naming it).
    """
    cls = class_name(model_or_config)
    if cls is None and isinstance(model_or_config, dict):
        cls = "UNet2DConditionModel"
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    raise UnsupportedModelError(f"{name or 'the model'}: a {cls} is not supported; aptp prunes "
                                f"{supported_classes()}")


def backbone_for_pipeline(pipeline_class: str) -> Backbone | None:
    """The adapter of the denoiser a diffusers pipeline class holds, or None."""
    for b in _REGISTRY.values():
        if pipeline_class in b.pipelines:
            return b
    return None


def supported_pipelines() -> tuple[str, ...]:
    seen: list[str] = []
    for b in _REGISTRY.values():
        seen += [p for p in b.pipelines if p not in seen]
    return tuple(seen)


def _register_builtin() -> None:
    import importlib

    from aptp.engine.backbones.unet import UNetBackbone

    register(UNetBackbone())
    for mod, cls in (("aptp.engine.backbones.pixart", "PixArtBackbone"), ("aptp.engine.backbones.sd3", "SD3Backbone"), ("aptp.engine.backbones.flux", "FluxBackbone")):
        try:  # a family module that does not exist (yet) is simply not offered
            register(getattr(importlib.import_module(mod), cls)())
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


_register_builtin()

__all__ = ["Backbone", "UnitCost", "UnsupportedModelError", "backbone_for", "backbone_for_pipeline", "get",
           "register", "supported_classes", "supported_pipelines"]
