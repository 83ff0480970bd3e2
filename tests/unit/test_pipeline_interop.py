"""A saved expert drops into a stock diffusers StableDiffusionPipeline as ``unet=``."""

from __future__ import annotations

import torch

from aptp.engine.expert import load_expert, save_expert
from aptp.engine.slicing import slice_unet
from aptp.engine.space import build_space
from tests.conftest import make_tiny_unet


def tiny_pipeline_parts():
    from diffusers import AutoencoderKL, PNDMScheduler
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "red", "blue", "circle", "square"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            max_position_embeddings=8, eos_token_id=3, bos_token_id=2,
                                            pad_token_id=0))
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                            layers_per_block=1, sample_size=16)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          skip_prk_steps=True, steps_offset=1, prediction_type="v_prediction")
    return dict(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, scheduler=sched)


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
