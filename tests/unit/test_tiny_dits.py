"""The tiny PixArt-α / SD3 / Flux pipeline folders of tests/tiny_dits.py: they save, load back with
``from_pretrained`` offline and sample a 2-step image with the stock pipelines; the recorded
shapes and text lengths are what the transformers receive."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_dits import make_tiny_flux_dir, make_tiny_pixart_dir, make_tiny_sd3_dir


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _load(info):
    import diffusers

    pipe = getattr(diffusers, info.pipeline).from_pretrained(info.path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == info.transformer
    return pipe


def _generate(pipe, info, prompt="a red circle left of a blue square"):
    """One 2-step PIL image; returns (image, the transformer's first call kwargs, positional args)."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    try:
        out = pipe(prompt, num_inference_steps=2, output_type="pil", generator=torch.Generator().manual_seed(0),
                   **info.call_kwargs)
    finally:
        handle.remove()
    image = out.images[0]
    assert image.size == (info.width, info.height)
    assert len(seen) == 2
    args, kwargs = seen[0]
    return image, kwargs, args


@pytest.mark.parametrize("conditions", [False, True], ids=["plain", "resolution-conditions"])
def test_tiny_pixart(tmp_path, conditions):
    info = make_tiny_pixart_dir(tmp_path / "pixart", use_additional_conditions=conditions)
    assert json.loads((info.path / "tiny_dit.json").read_text())["text_len"] == info.text_len == 16
    pipe = _load(info)
    t = pipe.transformer
    assert t.config.out_channels == 2 * t.config.in_channels == 8  # learned sigma
    assert t.use_additional_conditions is conditions
    _, kw, args = _generate(pipe, info)
    x = args[0] if args else kw["hidden_states"]
    assert tuple(x.shape[1:]) == info.latent_shape == (4, 8, 8)
    assert tuple(kw["encoder_hidden_states"].shape[1:]) == (info.text_len, 32)
    cond = kw["added_cond_kwargs"]
    assert (cond["resolution"] is not None) is conditions
    if conditions:
        assert cond["resolution"][0].tolist() == [16.0, 16.0] and cond["aspect_ratio"][0].tolist() == [1.0]


def test_tiny_sd3(tmp_path):
    info = make_tiny_sd3_dir(tmp_path / "sd3")
    pipe = _load(info)
    blocks = pipe.transformer.transformer_blocks
    assert len(blocks) == 3 and [b.context_pre_only for b in blocks] == [False, False, True]
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.vae.config.latent_channels == 16
    _, kw, _ = _generate(pipe, info)
    assert tuple(kw["hidden_states"].shape[1:]) == info.latent_shape == (16, 8, 8)
    assert tuple(kw["encoder_hidden_states"].shape[1:]) == (info.text_len, 48) == (16 + 16, 48)
    assert tuple(kw["pooled_projections"].shape[1:]) == (32,)
    assert kw["timestep"].dtype == torch.float32 and float(kw["timestep"].max()) == 1000.0


def test_tiny_flux(tmp_path):
    info = make_tiny_flux_dir(tmp_path / "flux")
    pipe = _load(info)
    t = pipe.transformer
    assert len(t.transformer_blocks) == 2 and len(t.single_transformer_blocks) == 2
    assert sum(t.config.axes_dims_rope) == t.config.attention_head_dim and t.config.guidance_embeds
    _, kw, _ = _generate(pipe, info)
    assert tuple(kw["hidden_states"].shape[1:]) == info.hidden_states_shape == (16, 64)  # 8×8 latent, packed 2×2
    assert tuple(kw["img_ids"].shape) == (16, 3) and tuple(kw["txt_ids"].shape) == (info.text_len, 3)
    assert tuple(kw["encoder_hidden_states"].shape[1:]) == (info.text_len, 32)
    assert tuple(kw["pooled_projections"].shape[1:]) == (16,)
    assert kw["guidance"] is not None
    assert 0 < float(kw["timestep"].max()) <= 1.0  # FluxPipeline passes t / 1000


def test_randomize_std_redraws_the_transformer(tmp_path):
    a = make_tiny_flux_dir(tmp_path / "a")
    b = make_tiny_flux_dir(tmp_path / "b", randomize_std=0.1)
    wa = _load(a).transformer.x_embedder.weight
    wb = _load(b).transformer.x_embedder.weight
    assert not torch.equal(wa, wb) and abs(float(wb.detach().std()) - 0.1) < 0.02


@pytest.mark.parametrize("name, cls, params", [
    ("pixart-alpha-xl-2-1024-transformer.json", "PixArtTransformer2DModel", 611_349_152),
    ("sd3-medium-transformer.json", "SD3Transformer2DModel", 2_028_328_000),
    ("flux1-dev-transformer.json", "FluxTransformer2DModel", 11_901_408_320),
])
def test_shipped_real_configs_build_on_meta(name, cls, params):
    """The full-size transformer configs the tiny pipelines stand in for (aptp/models/configs)."""
    from importlib import resources

    import diffusers

    cfg = json.loads((resources.files("aptp.models") / "configs" / name).read_text())
    assert cfg["_class_name"] == cls and "_diffusers_version" in cfg
    with torch.device("meta"):
        model = getattr(diffusers, cls).from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
