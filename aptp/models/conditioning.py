"""Text conditioning of a U-Net, one object for every supported model family.

SD 1.x / 2.x U-Nets take only ``encoder_hidden_states`` (B, L, dim). SDXL's U-Net
(``addition_embed_type="text_time"``) also needs ``added_cond_kwargs``: the pooled prompt
embedding of its second text encoder (``text_embeds``, (B, 1280)) and six "micro-conditioning"
numbers (``time_ids``: original size, crop top-left, target size). :class:`Conditioning` carries
both; diffusion transformers put their other batch-first inputs (PixArt's text attention mask,
SD3 / Flux's pooled projections, Flux's guidance) in ``extra``. The backbone adapter's ``forward``
is the one place that calls a denoiser with it (:func:`unet_forward` for U-Nets) and its
``encode_prompts`` the one place that builds it from a pipeline, so no training or generation
code branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Conditioning:
    """What a U-Net is conditioned on besides the noisy latent and the timestep.

    Attributes:
        encoder_hidden_states: (B, L, dim) token embeddings for cross-attention.
        added_cond_kwargs: extra inputs of U-Nets with added conditioning (SDXL: ``text_embeds``
            (B, pooled dim) and ``time_ids`` (B, 6)), or None.
        extra: other batch-first inputs of the denoiser, by name, or None.
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    extra: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    @property
    def shape(self) -> torch.Size:  # so code that only looks at the text tensor's shape still works
        return self.encoder_hidden_states.shape

    def _map(self, fn) -> "Conditioning":
        def each(d):
            return None if d is None else {k: fn(v) for k, v in d.items()}
        return Conditioning(fn(self.encoder_hidden_states), each(self.added_cond_kwargs), each(self.extra))

    def to(self, *args, **kwargs) -> "Conditioning":
        """Move / cast every tensor (integer masks keep their dtype when casting)."""
        def move(v):
            if not v.is_floating_point():
                kw = {k: a for k, a in kwargs.items() if k != "dtype"}
                pos = [a for a in args if not isinstance(a, torch.dtype)]
                return v.to(*pos, **kw)
            return v.to(*args, **kwargs)
        return self._map(move)

    def __getitem__(self, index) -> "Conditioning":
        """The conditioning of a subset of the batch (an index, slice or index tensor)."""
        return self._map(lambda v: v[index])

    @classmethod
    def cat(cls, items: list["Conditioning"]) -> "Conditioning":
        def join(name):
            first = getattr(items[0], name)
            return None if first is None else {k: torch.cat([getattr(c, name)[k] for c in items]) for k in first}
        return cls(torch.cat([c.encoder_hidden_states for c in items]), join("added_cond_kwargs"), join("extra"))


def as_conditioning(cond) -> Conditioning:
    """Accept a bare (B, L, dim) tensor (SD 1.x / 2.x callers) as a :class:`Conditioning`."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


def unet_forward(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
    """The U-Net's prediction (``.sample``) for ``sample`` at ``timestep`` under ``cond``.

    ``unet`` may be wrapped (DDP, accelerate): it is only called, never inspected.
    """
    cond = as_conditioning(cond)
    kwargs = {}
    if cond.added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = cond.added_cond_kwargs
    return unet(sample, timestep, encoder_hidden_states=cond.encoder_hidden_states, **kwargs).sample


def time_ids(height: int, width: int, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning for a training / generation size (h, w): original size (h, w),
    crop top-left (0, 0), target size (h, w); as the SDXL pipeline builds it, (batch, 6)."""
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype).repeat(batch, 1)


def added_cond_dims(config) -> dict[str, int] | None:
    """Shapes (per sample) of the ``added_cond_kwargs`` a U-Net config needs, or None."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("addition_embed_type") != "text_time":
        return None
    n_ids = 6
    pooled = int(get("projection_class_embeddings_input_dim")) - n_ids * int(get("addition_time_embed_dim"))
    return {"text_embeds": pooled, "time_ids": n_ids}


def dummy_conditioning(config, batch: int, text_len: int, device="meta", latent_size=None,
                       vae_scale_factor: int = 8) -> Conditioning:
    """Zero conditioning of the right shapes (for MACs counting on the meta device)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = torch.zeros(batch, text_len, get("cross_attention_dim"), device=device)
    dims = added_cond_dims(config)
    if dims is None:
        return Conditioning(text)
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else (latent_size or (128, 128))
    added = {"text_embeds": torch.zeros(batch, dims["text_embeds"], device=device),
             "time_ids": time_ids(h * vae_scale_factor, w * vae_scale_factor, batch, device=device)}
    return Conditioning(text, added)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
    """Conditioning of ``prompts`` exactly as ``pipe`` computes it for sampling (no CFG half).

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        prompts: the prompts.
        size: (height, width) of the images the latents come from (SDXL's time ids); default the
            pipeline's native size.
    """
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is None and added_cond_dims(pipe.unet.config) is None:
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return Conditioning(embeds)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    if size is None:
        s = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        size = (s, s)
    h, w = int(size[0]), int(size[1])
    ids = time_ids(h, w, len(prompts), device=device, dtype=embeds.dtype)
    return Conditioning(embeds, {"text_embeds": pooled.to(embeds.dtype), "time_ids": ids})
