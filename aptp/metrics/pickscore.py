"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on human preferences (Pick-a-Pic).

Score of an (image, prompt) pair, as in the reference usage of ``yuvalkirstain/PickScore_v1``:
``exp(logit_scale) * cos(E_image, E_text)`` with the model's learned temperature (about 100), so
scores lie in roughly [-100, 100] and are mostly around 20 for real images. We report the mean over
pairs.

Weights are only read locally: a folder holding the transformers ``CLIPModel`` (``config.json`` +
weights) and, in the same or another folder, its processor (tokenizer + image processor; the
reference uses ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s), or those hub ids already in the
Hugging Face cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aptp.errors import ModelNotFoundError

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["PICKSCORE_MODEL", "PICKSCORE_PROCESSOR", "PickScore"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

_HOW = (f"download {PICKSCORE_MODEL} (and the processor {PICKSCORE_PROCESSOR}) on a connected machine, e.g. "
        f"`huggingface-cli download {PICKSCORE_MODEL} --local-dir DIR`, and pass DIR as the PickScore model "
        "(--set eval.pickscore_model=DIR)")


def _looks_like_path(src: str) -> bool:
    return Path(src).expanduser().exists() or src.startswith((".", "/", "~")) or src.count("/") != 1


def _embeddings(out: Any) -> torch.Tensor:
    # transformers < 5 returns the projected embeddings; 5.x returns an output object holding them.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PickScore:
    """PickScore of images and their prompts.

    Args:
        model: A transformers ``CLIPModel``.
        tokenizer: Its tokenizer.
        image_processor: Its image processor.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, model: str | Path = PICKSCORE_MODEL, processor: str | Path | None = None,
                        device: str | torch.device = "cpu") -> PickScore:
        """Load PickScore offline.

        Args:
            model: A folder with the ``CLIPModel`` or a hub id in the local HF cache.
            processor: Folder or cached hub id of the tokenizer and image processor; None uses
                ``model`` when it holds a ``preprocessor_config.json``, else
                :data:`PICKSCORE_PROCESSOR`.
            device: Where to put the model.

        Raises:
            ModelNotFoundError: If the model or processor is not available locally (one line).
        """
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        src = str(model)
        if _looks_like_path(src) and not (Path(src).expanduser() / "config.json").is_file():
            raise ModelNotFoundError(f"PickScore model folder {src!r} has no config.json; {_HOW}")
        if processor is None:
            has_own = _looks_like_path(src) and (Path(src).expanduser() / "preprocessor_config.json").is_file()
            processor = src if has_own else PICKSCORE_PROCESSOR
        proc = str(processor)
        path_src = str(Path(src).expanduser()) if _looks_like_path(src) else src
        path_proc = str(Path(proc).expanduser()) if _looks_like_path(proc) else proc
        try:
            clip = CLIPModel.from_pretrained(path_src, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"PickScore weights {src!r} are not available locally "
                                     f"({type(exc).__name__}); {_HOW}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path_proc, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(path_proc, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"PickScore processor {proc!r} is not available locally "
                                     f"({type(exc).__name__}); {_HOW}") from None
        return cls(clip.to(device).float(), tokenizer, image_processor)

    @torch.inference_mode()
    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Per-pair PickScores ``exp(logit_scale) * cos(image_i, prompt_i)``.

        Returns:
            ``(N,)`` float64.

        Raises:
            ValueError: If the counts differ or are zero.
        """
        if len(images) != len(prompts) or not images:
            raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        max_length = min(77, int(getattr(self.tokenizer, "model_max_length", 77)))
        out = []
        for i in range(0, len(images), batch_size):
            imgs = [im.convert("RGB") for im in images[i:i + batch_size]]
            pix = self.image_processor(images=imgs, return_tensors="pt")["pixel_values"].to(device)  # (B, 3, S, S)
            tok = self.tokenizer(list(prompts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt").to(device)
            img = _embeddings(self.model.get_image_features(pixel_values=pix)).double()  # (B, d)
            txt = _embeddings(self.model.get_text_features(input_ids=tok["input_ids"],
                                                           attention_mask=tok.get("attention_mask"))).double()  # (B, d)
            cos = (torch.nn.functional.normalize(img, dim=-1) * torch.nn.functional.normalize(txt, dim=-1)).sum(-1)
            out.append((self.model.logit_scale.exp().double() * cos).cpu())  # (B,)
        return torch.cat(out)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 32) -> float:
        """Mean PickScore over pairs."""
        return float(self.scores(images, prompts, batch_size).mean())
