"""SDXL end to end on a tiny random StableDiffusionXLPipeline folder, offline, through the CLI:
prune (2 steps) → materialize → finetune (2 steps) → generate (1 image, DDIM)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from aptp.cli.main import app
from tests.conftest import TINY_UNET
from tests.unit.test_unets import TINY_SDXL

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1"})




def word_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from aptp.data.shapes import vocabulary

    words = ["<pad>", "<unk>", "<bos>", "<eos>", *vocabulary()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"), len(words)


def make_tiny_sdxl_dir(path):
    """A tiny StableDiffusionXLPipeline: two CLIP text encoders (16 + 16 = 32 = the U-Net's
    cross_attention_dim; pooled projection 16 = text_embeds), text_time U-Net, 2× VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = word_tokenizer(24)
    tokenizer_2, _ = word_tokenizer(24)
    text = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=24, eos_token_id=3, bos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**TINY_UNET, **TINY_SDXL})
        te1 = CLIPTextModel(CLIPTextConfig(**text))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=16))
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                            layers_per_block=1, sample_size=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=sched)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return make_tiny_sdxl_dir(tmp_path_factory.mktemp("tiny-sdxl") / "pipe")


def test_teacher_conditioning_matches_the_pipeline(sdxl_dir):
    from aptp.settings import ModelSettings
    from aptp.train.teacher import load_teacher

    t = load_teacher(ModelSettings(name=str(sdxl_dir)))
    assert type(t.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert not any(p.requires_grad for p in t.pipeline.text_encoder_2.parameters())
    cond = t.encode_text(["a red circle", "a blue square"], size=(16, 16))
    assert cond.encoder_hidden_states.shape == (2, 24, 32)
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 16)
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    x = torch.randn(2, 4, 8, 8)
    assert t.predict(t.unet, x, torch.tensor([1, 500]), cond).shape == x.shape


def test_prune_materialize_finetune_generate(sdxl_dir, tmp_path):
    from aptp.engine.expert import load_expert, read_plan

    run = tmp_path / "run"
    res = cli("prune", "--model", str(sdxl_dir), "--data", "shapes", "--resolution", "16", "--batch-size", "4",
              "--warmup-steps", "1", "--steps", "1", "--experts", "2", "--output", str(run), "--quiet",
              "--set", "data.max_samples=16", "--set", f"router.embedding_cache={tmp_path / 'emb'}",
              "--set", "prune.lr=0.5", "--set", "prune.lr_warmup_steps=1", "--set", "space.ffn_groups=8",
              "--set", "prune.log_every=1")
    assert res.exit_code == 0, res.output
    space = json.loads((run / "arch_space.json").read_text())
    inner = [s for s in space["segments"] if s["kind"] == "depth" and ".transformer_blocks." in s["module"]]
    assert len(inner) == 28
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    res = cli("materialize", str(run), "--quiet")
    assert res.exit_code == 0, res.output
    experts = json.loads((run / "experts.json").read_text())
    records = experts["experts"] if isinstance(experts, dict) else experts
    k = int(records[0]["expert"])
    expert_dir = run / records[0]["path"]
    assert type(load_expert(expert_dir)).__name__ == "UNet2DConditionModel"
    assert read_plan(expert_dir).vector

    res = cli("finetune", str(run), "--expert", str(k), "--steps", "2", "--batch-size", "2", "--quiet",
              "--set", "finetune.log_every=1")
    assert res.exit_code == 0, res.output
    assert (run / "finetuned" / f"expert-{k}" / "model.safetensors").is_file()

    out = tmp_path / "images"
    res = cli("generate", str(run), "a red circle", "--expert", str(k), "--output", str(out), "--steps", "2",
              "--scheduler", "ddim", "--guidance", "3", "--quiet")
    assert res.exit_code == 0, res.output
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 1 and manifest[0]["expert"] == k and (out / manifest[0]["file"]).is_file()


def test_sliced_expert_in_the_stock_sdxl_pipeline_equals_the_gated_teacher(sdxl_dir):
    """A sliced SDXL expert (inner transformer blocks skipped too) dropped into the stock
    StableDiffusionXLPipeline as ``unet=`` samples what the gated teacher samples."""
    from diffusers import StableDiffusionXLPipeline

    from aptp.engine.gates import UNetGates
    from aptp.engine.slicing import SkippedTransformerBlock, slice_unet
    from aptp.engine.space import build_space
    from tests.unit.test_unets import random_vectors

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe.unet
    with torch.no_grad():
        for p in teacher.parameters():  # stock init zeroes output layers; randomise so pruning shows
            p.normal_(0, 0.1)
    space = build_space(teacher, ffn_groups=8)
    v = random_vectors(space, seed=4)[8]
    expert, _ = slice_unet(teacher, space, v)
    assert any(isinstance(m, SkippedTransformerBlock) for m in expert.modules())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(height=16, width=16, num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="pt")
    gates = UNetGates(teacher, space)
    try:
        with gates.apply(v):
            gated = pipe("a red circle", **kw).images
    finally:
        gates.remove()
    pipe.unet = expert
    sliced = pipe("a red circle", **kw).images
    full = StableDiffusionXLPipeline(**{**pipe.components, "unet": teacher})("a red circle", **kw).images
    torch.testing.assert_close(sliced, gated, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sliced, full, atol=1e-3)


def test_inspect_model_on_the_sdxl_folder(sdxl_dir):
    from aptp.engine.macs import count_macs
    from aptp.models.registry import build_unet, default_text_len, resolve_model

    res = cli("inspect-model", "--model", str(sdxl_dir), "--resolution", "16", "--format", "json",
              "--set", "space.ffn_groups=8")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["units"]["by_kind"]["depth"] == 10 + 28
    ref = resolve_model(str(sdxl_dir))
    assert report["text_len"] == default_text_len(ref)  # the folder's tokenizer length, as the teacher's
    counted = count_macs(build_unet(ref), 8, text_len=report["text_len"]) / 1e9
    assert abs(report["gmacs"] - counted) <= 1e-9 + 1e-6 * counted
