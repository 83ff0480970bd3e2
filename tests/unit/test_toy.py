"""The embedded toy model: components, tokenizer, pipeline, domain CLIP and the training stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aptp.data.shapes_world import ShapesWorld
from aptp.errors import ModelNotFoundError, SettingsError
from aptp.models import toy
from aptp.train import toy as train_toy

REPO = Path(__file__).resolve().parents[2]
RECIPES = {stage: REPO / "recipes" / f"toy-{stage}.yaml" for stage in train_toy.STAGES}

# Each stage shrunk to seconds: tiny data subsets, small batches, every bookkeeping interval hit.
SMOKE = {
    "vae": ["vae.batch_size=4", "vae.train_samples=16", "vae.val_samples=8", "vae.scaling_samples=8",
            "vae.log_every=1", "vae.eval_every=2", "vae.checkpoint_every=1"],
    "teacher": ["teacher.vae=null", "teacher.batch_size=8", "teacher.train_samples=16", "teacher.val_samples=8",
                "teacher.val_timesteps=[500]", "teacher.samples_per_tier=1", "teacher.sample_steps=2",
                "teacher.log_every=1", "teacher.eval_every=2", "teacher.checkpoint_every=1"],
    "clip": ["clip.batch_size=8", "clip.train_samples=32", "clip.val_samples=8", "clip.log_every=1",
             "clip.eval_every=2", "clip.checkpoint_every=1"],
}


@pytest.fixture(scope="module")
def random_pipeline():
    pipe = toy.build_toy_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- components


def test_unet_has_sd21_topology():
    sd21 = json.loads((REPO / "aptp" / "models" / "configs" / "sd2.1-unet.json").read_text())
    cfg = toy.toy_unet_config()
    for key in ("down_block_types", "up_block_types", "layers_per_block", "use_linear_projection",
                "upcast_attention", "flip_sin_to_cos", "freq_shift", "act_fn", "in_channels", "out_channels"):
        assert cfg[key] == sd21[key], key
    assert cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert cfg["block_out_channels"] == [32, 64, 128, 128]
    assert cfg["norm_num_groups"] == 8 and cfg["cross_attention_dim"] == 64 and cfg["sample_size"] == 16

    unet = toy.build_unet()
    assert [type(b).__name__ for b in unet.down_blocks] == sd21["down_block_types"]
    assert [type(b).__name__ for b in unet.up_blocks] == sd21["up_block_types"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    # attention_head_dim [2, 4, 8, 8] is read as head counts, as in SD 2.1: head size 16 everywhere.
    for block, heads in zip(unet.down_blocks[:3], [2, 4, 8]):
        for transformer in block.attentions:
            tb = transformer.transformer_blocks[0]
            assert transformer.use_linear_projection
            assert tb.attn1.heads == heads and tb.attn2.heads == heads
            assert tb.attn1.inner_dim // tb.attn1.heads == 16
            assert type(tb.ff.net[0]).__name__ == "GEGLU"
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 8
    for block, heads in zip(unet.up_blocks[1:], [8, 4, 2]):
        assert block.attentions[0].transformer_blocks[0].attn2.heads == heads
    assert all(m.num_groups == 8 for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    assert 8.0e6 < sum(p.numel() for p in unet.parameters()) < 9.5e6


def test_shipped_unet_config_matches_code():
    shipped = json.loads((REPO / "aptp" / "models" / "configs" / "toy-unet.json").read_text())
    assert shipped.pop("_class_name") == "UNet2DConditionModel"
    assert shipped == toy.toy_unet_config()


def test_vae_maps_64px_to_4x16x16():
    vae = toy.build_vae()
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert z.shape == (1, 4, 16, 16)
        assert vae.decode(z).sample.shape == (1, 3, 64, 64)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == toy.VAE_SCALE_FACTOR


def test_scheduler_configs_match_sd21():
    from diffusers import DDIMScheduler, PNDMScheduler

    pndm = PNDMScheduler(**toy.toy_scheduler_config())
    assert pndm.config.prediction_type == "v_prediction" and pndm.config.skip_prk_steps
    assert pndm.config.steps_offset == 1 and pndm.config.beta_schedule == "scaled_linear"
    ddim = DDIMScheduler(**toy.toy_ddim_config())
    torch.testing.assert_close(ddim.alphas_cumprod, pndm.alphas_cumprod)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_200_captions():
    tok = toy.build_tokenizer()
    world = ShapesWorld(0)
    rng = np.random.default_rng(0)
    indices = rng.choice(world.split_size("train"), size=200, replace=False)
    captions = [world.sample("train", int(i)).caption for i in indices]
    enc = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True)
    for caption, ids in zip(captions, enc.input_ids):
        words = caption.split()
        assert len(ids) == toy.MAX_LENGTH
        assert tok.unk_token_id not in ids, caption
        assert ids[0] == tok.bos_token_id and ids[len(words) + 1] == tok.eos_token_id
        assert all(i == tok.pad_token_id for i in ids[len(words) + 2:])
        assert tok.convert_ids_to_tokens(ids[1:len(words) + 1]) == [w.lower() for w in words]
        assert tok.decode(ids, skip_special_tokens=True) == caption.lower()


def test_tokenizer_covers_the_whole_vocabulary_and_longest_caption():
    tok = toy.build_tokenizer()
    words = ShapesWorld(0).vocabulary()
    ids = tok(" ".join(words), add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and len(set(ids)) == len(words)
    longest = max(ShapesWorld(0).captions("train", 2000), key=lambda c: len(c.split()))
    assert len(longest.split()) + 2 <= toy.MAX_LENGTH
    # eos id 2 would switch transformers' CLIPTextModel to its legacy argmax pooling
    assert tok.eos_token_id != 2 and tok.eos_token_id == toy.toy_text_encoder_config()["eos_token_id"]
    assert tok.tokenize("A RED, circle")[:2] == ["a", "red"]


# ----------------------------------------------------------------------------- pipeline


def test_random_pipeline_renders_two_prompts(random_pipeline):
    images = random_pipeline(["a red circle", "the word SUN in white letters on a black background"],
                             num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0),
                             output_type="np").images
    assert images.shape == (2, 64, 64, 3)
    assert np.isfinite(images).all()


def test_encode_prompt_with_classifier_free_guidance(random_pipeline):
    pipe = random_pipeline
    cond, uncond = pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 1, True, negative_prompt=None)
    assert cond.shape == uncond.shape == (2, toy.MAX_LENGTH, 64)
    empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
    torch.testing.assert_close(uncond[0], empty[0])  # the unconditional branch is the empty prompt


def test_export_and_offline_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = toy.build_toy_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "teacher" / "pipeline")
    clip = toy.build_domain_clip(seed=0)
    toy.save_domain_clip(clip, tmp_path / "clip" / "domain-clip")
    sizes = train_toy.export_assets(tmp_path / "teacher", tmp_path / "clip", tmp_path / "assets")
    assert sum(sizes.values()) < 30 * 2**20  # the shipped-assets budget, float16

    loaded = toy.load_toy_pipeline(folder=tmp_path / "assets" / "toy")
    assert loaded.unet.dtype == torch.float32 and loaded.vae_scale_factor == 4
    w0 = pipe.unet.conv_in.weight
    torch.testing.assert_close(loaded.unet.conv_in.weight, w0.half().float())
    assert loaded.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    assert type(toy.load_toy_pipeline(folder=tmp_path / "assets" / "toy", scheduler="ddim").scheduler).__name__ \
        == "DDIMScheduler"

    model, preprocess, tokenizer = toy.load_domain_clip(tmp_path / "assets" / "domain-clip")
    tokens = tokenizer(["a red circle", "two green triangles left of a yellow star"])
    assert tokens.shape == (2, toy.CLIP_CONTEXT_LENGTH)
    assert tokens[0].tolist()[:5] == toy.build_tokenizer()("a red circle").input_ids
    image = preprocess(ShapesWorld(0).sample("validation", 0).image)
    assert image.shape == (3, 64, 64)
    with torch.no_grad():
        f_img = model.encode_image(image[None], normalize=True)
        f_txt = model.encode_text(tokens, normalize=True)
        ref = clip.eval().encode_text(tokens, normalize=True)
    assert f_img.shape == (1, 128) and f_txt.shape == (2, 128)
    torch.testing.assert_close(f_txt, ref, atol=2e-2, rtol=0)  # float16 storage


def test_missing_assets_raise_one_line_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="python -m aptp.train.toy teacher"):
        toy.load_toy_pipeline(folder=tmp_path)
    with pytest.raises(ModelNotFoundError, match="python -m aptp.train.toy clip"):
        toy.load_domain_clip(tmp_path)


@pytest.mark.skipif(not (toy.toy_assets_dir() / "model_index.json").is_file(), reason="toy weights not exported yet")
def test_shipped_toy_pipeline_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = toy.load_toy_pipeline()
    images = pipe(["a red circle"], num_inference_steps=2, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)


@pytest.mark.skipif(not (toy.domain_clip_assets_dir() / "open_clip_config.json").is_file(),
                    reason="domain CLIP not exported yet")
def test_shipped_domain_clip_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _, tokenizer = toy.load_domain_clip()
    with torch.no_grad():
        assert model.encode_text(tokenizer(["a red circle"])).shape == (1, 128)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("stage", train_toy.STAGES)
def test_recipe_validates(stage):
    settings = train_toy.load_toy_settings(RECIPES[stage])
    assert RECIPES[stage].read_text().startswith("#")
    assert f"python -m aptp.train.toy {stage}" in RECIPES[stage].read_text()
    assert getattr(settings, stage).steps > 0


def test_settings_report_every_problem_in_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher:\n  stepz: 3\n  lr: -1\n  tier_weights: {easy: 1}\n")
    with pytest.raises(SettingsError) as info:
        train_toy.load_toy_settings(recipe)
    msg = str(info.value)
    assert "\n" not in msg and "3 problems" in msg
    assert "teacher.stepz: unknown key" in msg and "teacher.lr" in msg and "missing ['hard'" in msg


@pytest.mark.parametrize("stage", train_toy.STAGES)
def test_stage_trains_two_steps_and_resumes(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    result = train_toy.train_stage(stage, out, recipe=RECIPES[stage], overrides=SMOKE[stage], steps=2, quiet=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["stage"] == stage
    assert result["steps"] == 2 and np.isfinite(list(result["metrics"].values())).all()
    product = {"vae": "vae/config.json", "teacher": "pipeline/model_index.json",
               "clip": "domain-clip/open_clip_config.json"}[stage]
    assert (out / product).is_file() and (out / "settings.yaml").is_file() and (out / "run-meta.json").is_file()

    with pytest.raises(Exception, match="not empty"):  # never silently overwritten
        train_toy.train_stage(stage, out, recipe=RECIPES[stage], overrides=SMOKE[stage], steps=2, quiet=True)

    train_toy.train_stage(stage, out, steps=3, resume=True, quiet=True)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [ln["step"] for ln in lines if ln["kind"] == "train"]
    assert train_steps == [1, 2, 3]  # resumed at 2: step 3 only was trained again
    assert all(ln["train_wall_s"] > 0 for ln in lines if ln["kind"] == "train")
    if stage == "teacher":
        assert (out / "samples.png").is_file() and (out / "latents.pt").is_file()
        toy.load_toy_pipeline(folder=out / "pipeline")
    if stage == "clip":
        assert 0.0 <= result["metrics"]["val_top1"] <= 1.0


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_toy.train_stage("vae", straight, recipe=RECIPES["vae"], overrides=SMOKE["vae"], steps=4, quiet=True)
    train_toy.train_stage("vae", split, recipe=RECIPES["vae"], overrides=SMOKE["vae"], steps=2, quiet=True)
    train_toy.train_stage("vae", split, steps=4, resume=True, quiet=True)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["state"]["vae"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["state"]["vae"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_resume_refuses_a_different_recipe(tmp_path):
    out = tmp_path / "run"
    train_toy.train_stage("vae", out, recipe=RECIPES["vae"], overrides=SMOKE["vae"], steps=1, quiet=True)
    changed = tmp_path / "changed.yaml"
    changed.write_text(RECIPES["vae"].read_text().replace("lr: 1.0e-3", "lr: 0.5"))
    with pytest.raises(SettingsError, match=r"differs .*\['lr'\]"):
        train_toy.train_stage("vae", out, recipe=changed, overrides=SMOKE["vae"], steps=2, resume=True, quiet=True)
    # the same recipe and overrides as the original run are accepted
    train_toy.train_stage("vae", out, recipe=RECIPES["vae"], overrides=SMOKE["vae"], steps=2, resume=True, quiet=True)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_cli_exit_codes(tmp_path, capsys):
    assert train_toy.main(["vae", "--recipe", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    args = ["vae", "--recipe", str(RECIPES["vae"]), "--output", str(tmp_path / "o"), "--steps", "1", "--quiet"]
    assert train_toy.main(args + [f"--set={s}" for s in SMOKE["vae"]]) == 0
    assert train_toy.main(args) == 2  # output exists
