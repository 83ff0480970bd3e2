"""Feature extractors for the image metrics: CLIP (open_clip) and Inception (torch-fidelity).

Every extractor maps a list of PIL images to an ``(N, d)`` float64 tensor and carries a
``feature_id`` that changes whenever its weights or preprocessing change, so cached real
statistics are keyed by the network that produced them (:mod:`aptp.metrics.fid`).

- :class:`ClipFeatures` wraps an open_clip model (``model, preprocess, tokenizer``) and gives
  L2-normalised image and text embeddings. :meth:`ClipFeatures.from_open_clip` loads a built-in
  open_clip architecture with weights from a local file or the local caches only (never the
  network); :meth:`ClipFeatures.domain_clip` loads the shapes world's domain CLIP.
- :class:`InceptionFeatures` is the standard FID network (2048-d pool features of torch-fidelity's
  InceptionV3, through torchmetrics' wrapper) when torch-fidelity and its weight file are present.
- :class:`FeatureNet` adapts any extractor to the ``nn.Module`` torchmetrics'
  ``FrechetInceptionDistance(feature=...)`` expects: uint8 ``(N, 3, H, W)`` in, ``(N, d)`` out.

Missing weights raise :class:`aptp.errors.ModelNotFoundError` with one line naming the file and
how to supply it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from aptp.errors import ModelNotFoundError

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPEN_CLIP_TAG",
    "INCEPTION_WEIGHTS_NAME",
    "ClipFeatures",
    "FeatureNet",
    "ImageFeatureExtractor",
    "InceptionFeatures",
    "images_to_uint8",
    "inception_available",
    "load_fid_features",
    "module_fingerprint",
    "resolve_open_clip_weights",
    "uint8_to_images",
]

# open_clip has no "default" weights per architecture; ``pretrained=None`` means OpenAI's, the
# weights the original CLIP score (Hessel et al. 2021) was defined with.
DEFAULT_OPEN_CLIP_TAG = "openai"

# torch-fidelity's InceptionV3 (TF FID weights converted to PyTorch); torch.hub caches it under
# this name in ``<torch hub dir>/checkpoints``.
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


@runtime_checkable
class ImageFeatureExtractor(Protocol):
    """What the FID code needs from a feature network."""

    feature_id: str
    num_features: int

    def image_features(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """``(N, d)`` float64 features of ``images``."""
        ...


# ----------------------------------------------------------------------------- helpers


def module_fingerprint(module: nn.Module, extra: str = "") -> str:
    """A short content hash of a module's parameters and buffers (names, dtypes, shapes, values).

    Two models with the same weights get the same fingerprint wherever they were loaded from, and
    retraining a model changes it, so caches keyed by it never go stale silently.

    Args:
        module: The network.
        extra: Anything else that changes the features (e.g. the preprocessing), mixed in.

    Returns:
        16 hex digits of a SHA-256.
    """
    h = hashlib.sha256(extra.encode())
    for name, t in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def images_to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack same-size PIL images into a uint8 ``(N, 3, H, W)`` tensor (RGB).

    Raises:
        ValueError: If the images differ in size.
    """
    import numpy as np

    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"images have different sizes {sorted(sizes)}; resize them to one size first")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]  # (H, W, 3) each
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def uint8_to_images(x: torch.Tensor) -> list[Image.Image]:
    """The inverse of :func:`images_to_uint8`; float input in [0, 1] is scaled to 0..255 first.

    Args:
        x: ``(N, 3, H, W)`` uint8, or float in [0, 1].
    """
    from PIL import Image

    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
    arr = x.detach().cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    return [Image.fromarray(a, mode="RGB") for a in arr]


def _batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- CLIP


def resolve_open_clip_weights(name: str, pretrained: str | None, cache_dir: str | Path | None = None) -> Path:
    """Find the weight file of an open_clip model locally, without touching the network.

    Args:
        name: A built-in open_clip architecture (``"ViT-B-32"``).
        pretrained: A weight file path, or an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``);
            None means :data:`DEFAULT_OPEN_CLIP_TAG`.
        cache_dir: Hugging Face hub cache to search (None: the default one, ``HF_HUB_CACHE``);
            URL downloads are looked for in ``~/.cache/clip`` (open_clip's default) or in
            ``cache_dir`` when given.

    Returns:
        The path of the weight file.

    Raises:
        ModelNotFoundError: If the file is not there (one line naming it and how to supply it).
    """
    import open_clip

    how = "--set eval.clip_pretrained=/path/to/open_clip_pytorch_model.bin"
    tag = DEFAULT_OPEN_CLIP_TAG if pretrained is None else pretrained
    path = Path(tag).expanduser()
    if path.is_file():
        return path
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        if os.sep in tag or path.suffix in (".bin", ".pt", ".pth", ".safetensors"):
            raise ModelNotFoundError(f"CLIP weight file {str(path)!r} does not exist; pass an existing file with {how}")
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelNotFoundError(
            f"{tag!r} is neither a weight file nor an open_clip tag of {name!r} (tags: {', '.join(tags) or 'none'}); "
            f"pass a weight file with {how}"
        )
    looked: list[str] = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        filenames = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth", ".pt")):
            filenames.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        for fn in filenames:
            hit = try_to_load_from_cache(repo_id, fn, cache_dir=None if cache_dir is None else str(cache_dir))
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
        looked.append(f"{repo_id}/{filenames[-1]} in the Hugging Face cache")
    url = cfg.get("url", "")
    if url:
        url_dir = Path(cache_dir) if cache_dir is not None else Path("~/.cache/clip").expanduser()
        candidate = url_dir / os.path.basename(url)
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    raise ModelNotFoundError(
        f"CLIP weights {name}/{tag} are not available offline (looked for {' and '.join(looked)}); "
        f"download them on a connected machine or pass the file with {how}"
    )


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist())


class ClipFeatures:
    """L2-normalised CLIP image and text embeddings from an open_clip model.

    Args:
        model: An ``open_clip.CLIP``-like module with ``encode_image`` and ``encode_text``.
        preprocess: PIL image -> normalised ``(3, S, S)`` tensor (open_clip's validation transform).
        tokenizer: list of str -> LongTensor ``(B, context_length)``.
        label: Human-readable name of the network, the start of :attr:`feature_id`.
    """

    def __init__(self, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], label: str = "clip") -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.label = label
        self._feature_id: str | None = None
        self._num_features: int | None = None

    # -- constructors

    @classmethod
    def from_open_clip(cls, name: str = "ViT-B-32", pretrained: str | None = None,
                       device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> ClipFeatures:
        """Load an open_clip model offline.

        Args:
            name: A built-in architecture (``"ViT-B-32"``), or ``"local-dir:<folder>"`` /
                ``"hf-hub:<org/repo>"`` (the latter from the local HF cache only).
            pretrained: Weight file path or open_clip tag; None means OpenAI's weights. Ignored
                for ``local-dir:`` and ``hf-hub:`` names, which carry their weights. A bare file
                says nothing about its activation: for a file of OpenAI weights name the
                architecture ``"ViT-B-32-quickgelu"`` (a tag sets QuickGELU by itself).
            device: Where to put the model.
            cache_dir: Hugging Face hub cache to look in (None: the default).

        Raises:
            ModelNotFoundError: If the weights are not available locally.
        """
        import open_clip

        label = None
        if name.startswith("hf-hub:"):
            # Resolve the cached snapshot folder and load it as a local dir: never a network call.
            from huggingface_hub import try_to_load_from_cache

            repo = name.removeprefix("hf-hub:")
            hit = try_to_load_from_cache(repo, "open_clip_config.json",
                                         cache_dir=None if cache_dir is None else str(cache_dir))
            if not isinstance(hit, str):
                raise ModelNotFoundError(
                    f"open_clip model {repo!r} is not in the Hugging Face cache; download it on a connected "
                    "machine or pass its folder as local-dir:/path/to/folder"
                )
            name, label = f"local-dir:{Path(hit).parent}", f"open_clip-{repo.replace('/', '-')}"
        if name.startswith("local-dir:"):
            folder = Path(name.removeprefix("local-dir:")).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise ModelNotFoundError(
                    f"no open_clip model folder at {str(folder)!r} (open_clip_config.json is missing); "
                    "pass a folder written by open_clip's save or aptp.models.toy.save_domain_clip"
                )
            if not any((folder / f).is_file() for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
                raise ModelNotFoundError(
                    f"open_clip model folder {str(folder)!r} has no open_clip_model.safetensors or "
                    "open_clip_pytorch_model.bin; copy the weight file into it"
                )
            spec = f"local-dir:{folder.resolve()}"
            model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
            return cls(model.float(), preprocess, open_clip.get_tokenizer(spec), label=label or f"open_clip-{folder.name}")
        if name not in open_clip.list_models():
            raise ModelNotFoundError(f"{name!r} is not an open_clip architecture; use e.g. 'ViT-B-32'")
        weights = resolve_open_clip_weights(name, pretrained, cache_dir)
        tag = DEFAULT_OPEN_CLIP_TAG if pretrained is None else pretrained
        cfg = open_clip.get_pretrained_cfg(name, tag)  # {} for a file path
        kwargs: dict[str, Any] = {}
        if cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True  # what the tag was trained with; a file path can't say
        if cfg.get("mean") and cfg.get("std"):
            kwargs.update(image_mean=tuple(cfg["mean"]), image_std=tuple(cfg["std"]))
        if _is_torchscript(weights):
            # OpenAI's original checkpoints (open_clip's URL downloads) are TorchScript archives,
            # which torch.load refuses with weights_only=True; torch.jit.load runs no pickled code.
            kwargs["weights_only"] = False
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights), device=device, **kwargs)
        label = f"open_clip-{name}-{tag if cfg else weights.stem}"
        return cls(model.float(), preprocess, open_clip.get_tokenizer(name), label=label)

    @classmethod
    def domain_clip(cls, folder: str | Path | None = None, device: str | torch.device = "cpu") -> ClipFeatures:
        """The shapes world's domain CLIP (:func:`aptp.models.toy.load_domain_clip`).

        Raises:
            ModelNotFoundError: If the domain CLIP is not installed at ``folder``.
        """
        from aptp.models.toy import load_domain_clip

        model, preprocess, tokenizer = load_domain_clip(folder, device=device)
        return cls(model, preprocess, tokenizer, label="domain-clip")

    # -- identity

    @property
    def feature_id(self) -> str:
        """``<label>-<fingerprint of weights and preprocessing>``; the key of cached statistics."""
        if self._feature_id is None:
            self._feature_id = f"{self.label}-{module_fingerprint(self.model, extra=repr(self.preprocess))}"
        return self._feature_id

    @property
    def num_features(self) -> int:
        """Embedding width ``d``."""
        if self._num_features is None:
            dim = getattr(getattr(self.model, "visual", None), "output_dim", None)
            if not isinstance(dim, int):
                dim = int(self.text_features(["a"]).shape[-1])
            self._num_features = dim
        return self._num_features

    # -- features

    @torch.inference_mode()
    def image_features(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings.

        Args:
            images: PIL images (any size; ``preprocess`` resizes them).
            batch_size: Images per forward pass.

        Returns:
            ``(N, d)`` float64, unit rows.
        """
        device = _device_of(self.model)
        out = [torch.zeros(0, self.num_features, dtype=torch.float64)] if not images else []
        for chunk in _batches(images, batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in chunk]).to(device)  # (B, 3, S, S)
            out.append(self.model.encode_image(x).double().cpu())  # (B, d)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings.

        Returns:
            ``(N, d)`` float64, unit rows.
        """
        device = _device_of(self.model)
        out = []
        for chunk in _batches(list(texts), batch_size):
            tokens = self.tokenizer(list(chunk)).to(device)  # (B, context_length)
            out.append(self.model.encode_text(tokens).double().cpu())  # (B, d)
        if not out:
            return torch.zeros(0, self.num_features, dtype=torch.float64)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def __repr__(self) -> str:
        return f"ClipFeatures({self.label!r})"


# ----------------------------------------------------------------------------- Inception


def inception_available(weights_path: str | Path | None = None) -> bool:
    """Whether :class:`InceptionFeatures` can be built offline (torch-fidelity + weight file)."""
    try:
        _inception_weights(weights_path)
    except ModelNotFoundError:
        return False
    return True


def _inception_weights(weights_path: str | Path | None) -> Path:
    import importlib.util

    alt = "or use CLIP features with --set eval.fid_features=domain-clip"
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModelNotFoundError(
            f"Inception FID features need torch-fidelity and {INCEPTION_WEIGHTS_NAME}; "
            f"install it with `pip install torch-fidelity` and put the file in {Path(torch.hub.get_dir()) / 'checkpoints'}, {alt}"
        )
    path = (Path(weights_path).expanduser() if weights_path is not None
            else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME)
    if not path.is_file():
        raise ModelNotFoundError(
            f"Inception FID weights {str(path)!r} not found; download {INCEPTION_WEIGHTS_NAME} (torch-fidelity's "
            f"release v0.2.0) on a connected machine and pass it with --set eval.fid_features=/path/to/{INCEPTION_WEIGHTS_NAME}, {alt}"
        )
    return path


class InceptionFeatures:
    """The standard FID network: 2048-d InceptionV3 pool features (torch-fidelity's TF port).

    Args:
        weights_path: The ``.pth`` file; None looks in torch.hub's cache
            (``<hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``).
        device: Where to run it.

    Raises:
        ModelNotFoundError: If torch-fidelity or the weight file is missing.
    """

    num_features = 2048

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        path = _inception_weights(weights_path)
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(path)).to(device)
        with open(path, "rb") as fh:  # the file is the identity; hashing it beats hashing 24M params
            self.feature_id = f"inception-v3-2048-{hashlib.sha256(fh.read()).hexdigest()[:16]}"

    @torch.inference_mode()
    def image_features(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """``(N, 2048)`` float64 pool features; images of one size per batch are stacked."""
        out = [torch.zeros(0, self.num_features, dtype=torch.float64)]
        for chunk in _batches(images, batch_size):
            groups = [chunk] if len({im.size for im in chunk}) == 1 else [[im] for im in chunk]
            for g in groups:
                x = images_to_uint8(g).to(_device_of(self.net))  # (B, 3, H, W) uint8
                out.append(self.net(x).reshape(len(g), -1).double().cpu())  # (B, 2048)
        return torch.cat(out)


# ----------------------------------------------------------------------------- torchmetrics adapter


class FeatureNet(nn.Module):
    """Any :class:`ImageFeatureExtractor` as the ``feature`` network of torchmetrics' FID.

    torchmetrics calls it with the tensors given to ``update``: uint8 ``(N, 3, H, W)`` (or float
    in [0, 1] with ``normalize=True``). The tensors become PIL images and go through the
    extractor's own path, so ``FeatureNet(x)`` equals ``extractor.image_features(uint8_to_images(x))``
    exactly, and FID from torchmetrics equals :func:`aptp.metrics.fid.frechet_distance` on the same
    images.

    Args:
        extractor: The feature network (e.g. :class:`ClipFeatures`).
        batch_size: Images per forward pass inside one call.
    """

    def __init__(self, extractor: ImageFeatureExtractor, batch_size: int = 64) -> None:
        super().__init__()
        self.extractor = extractor
        self.batch_size = batch_size
        self.num_features: int = int(extractor.num_features)  # read by torchmetrics to size its states
        for attr in ("model", "net"):
            inner = getattr(extractor, attr, None)
            if isinstance(inner, nn.Module):
                self.net = inner  # registered, so .to(device) on the metric moves it too
                break

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` uint8 -> ``(N, d)`` float64 features."""
        return self.extractor.image_features(uint8_to_images(x), batch_size=self.batch_size)

    def train(self, mode: bool = True) -> FeatureNet:
        """Stay in eval mode (the metric may call ``train()``)."""
        return super().train(False)


def load_fid_features(spec: str | None, clip: ClipFeatures | None = None,
                      device: str | torch.device = "cpu") -> ImageFeatureExtractor:
    """The FID feature network named by ``eval.fid_features``.

    Args:
        spec: ``None`` or ``"inception"``: InceptionV3 (torch-fidelity, weights from torch.hub's
            cache); a ``.pth`` file: InceptionV3 with those weights; ``"domain-clip"``: the shipped
            domain CLIP; ``"domain-clip:<folder>"`` or a folder with ``open_clip_config.json``: that
            open_clip model; ``"clip"``: ``clip`` (the CLIP-score network).
        clip: The CLIP-score extractor, for ``"clip"``.
        device: Where to put a newly loaded network.

    Raises:
        ModelNotFoundError: If the network's weights are missing (one line).
        ValueError: For ``"clip"`` without ``clip``.
    """
    if spec is None or spec == "inception":
        return InceptionFeatures(device=device)
    if spec == "clip":
        if clip is None:
            raise ValueError("fid_features='clip' needs the CLIP feature extractor")
        return clip
    if spec == "domain-clip":
        return ClipFeatures.domain_clip(device=device)
    if spec.startswith("domain-clip:"):
        return ClipFeatures.domain_clip(spec.removeprefix("domain-clip:"), device=device)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ClipFeatures.from_open_clip(f"local-dir:{path}", device=device)
    return InceptionFeatures(path, device=device)
