"""A saved expert drops into a stock diffusers StableDiffusionPipeline as ``unet=``."""

from __future__ import annotations

import torch

from aptp.engine.expert import load_expert, save_expert
from aptp.engine.slicing import slice_unet
from aptp.engine.space import build_space
from tests.conftest import make_tiny_unet, tiny_pipeline_parts


def test_loaded_expert_runs_in_stock_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    teacher = make_tiny_unet()
    space = build_space(teacher, ffn_groups=8)
    g = torch.Generator("cpu").manual_seed(0)
    v = (torch.rand(space.size, generator=g) < 0.6).float()
    sliced, plan = slice_unet(teacher, space, v)
    expert = load_expert(save_expert(sliced, plan, tmp_path / "expert"))
    pipe = StableDiffusionPipeline(unet=expert, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **tiny_pipeline_parts())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=3.0,
                  height=16, width=16, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()
    assert sum(p.numel() for p in expert.parameters()) < sum(p.numel() for p in teacher.parameters())
