"""Shared fixtures: tiny models with Stable Diffusion 2.1's block topology."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SD 2.1's layout (3 cross-attention down blocks + a plain one, mirrored up blocks, linear
# projections, attention_head_dim read as head counts), scaled down to seconds on a CPU.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 2, 4, 4),
    norm_num_groups=8,
    use_linear_projection=True,
    upcast_attention=True,
)


def make_tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**TINY_UNET, **overrides})
        # stock init zeroes some output layers; randomise every tensor so slicing errors show
        with torch.no_grad():
            for p in unet.parameters():
                p.normal_(0, 0.2)
    return unet.eval()


@pytest.fixture(scope="session")
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture()
def tiny_inputs():
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 400, 900])
    c = torch.randn(3, 7, 32, generator=g)
    return x, t, c
