"""The toy DiT teacher's training script (aptp.train.toy_dit) on a tiny config: train, resume, export, sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aptp.errors import SettingsError
from aptp.models import toy
from aptp.train import toy_dit

RECIPE = Path(toy_dit.__file__).resolve().parents[1] / "recipes" / "toy-dit-teacher.yaml"

# A one-block, 4-head transformer on 32 training latents: seconds on a CPU, every interval hit.
SMOKE = ["dit.num_layers=1", "dit.num_attention_heads=4", "dit.attention_head_dim=8", "dit.batch_size=4",
         "dit.train_samples=32", "dit.val_samples=8", "dit.val_timesteps=[500]", "dit.encode_batch_size=32",
         "dit.samples_per_tier=0", "dit.log_every=1", "dit.eval_every=2", "dit.checkpoint_every=1",
         "dit.caption_dropout=0.5"]

# the shipped toy pipeline (frozen VAE and text encoder) is package data: no skip if it were missing


def test_recipe_validates_and_fits_the_size_budget():
    settings = toy_dit.load_dit_settings(RECIPE)
    cfg = settings.dit
    assert "python -m aptp.train.toy_dit train" in RECIPE.read_text()
    assert cfg.num_attention_heads >= 4 and cfg.patch_size == 2 and cfg.steps > 0
    with torch.device("meta"):
        n = sum(p.numel() for p in toy_dit.build_transformer(cfg, seed=None).parameters())
    assert n * 2 <= 12 * 2**20  # float16 transformer <= 12 MiB
    with pytest.raises(SettingsError, match="dit.stepz: unknown key"):
        toy_dit.load_dit_settings(RECIPE, ["dit.stepz=3"])


def test_train_resume_export_and_sample(tmp_path, monkeypatch):
    from diffusers import PixArtAlphaPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    toy_dit.train_dit(straight, recipe=RECIPE, overrides=SMOKE, steps=4, quiet=True)
    first = toy_dit.train_dit(split, recipe=RECIPE, overrides=SMOKE, steps=2, quiet=True)
    assert np.isfinite(list(first["metrics"].values())).all()
    with pytest.raises(Exception, match="not empty"):  # never silently overwritten
        toy_dit.train_dit(split, recipe=RECIPE, overrides=SMOKE, steps=2, quiet=True)
    result = toy_dit.train_dit(split, steps=4, resume=True, quiet=True)
    assert result["steps"] == 4 and (split / "pipeline" / "model_index.json").is_file()
    lines = [json.loads(ln) for ln in (split / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if ln["kind"] == "train"] == [1, 2, 3, 4]

    # a resumed run takes the same batches, noise and timesteps as an uninterrupted one
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and b["stage"] == "dit"
    for key in a["state"]["ema_transformer"]:
        torch.testing.assert_close(a["state"]["ema_transformer"][key], b["state"]["ema_transformer"][key], msg=key)

    # export: from the finished pipeline, and from the checkpoint of a run without one (same EMA weights)
    info = toy_dit.export_dit(split, tmp_path / "toy-dit")
    assert info["step"] is None
    shutil.rmtree(straight / "pipeline")
    info = toy_dit.export_dit(straight, tmp_path / "from-ckpt")
    assert info["step"] == 4
    folder = tmp_path / "toy-dit"
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):  # byte-identical to the toy's
        for f in (toy.toy_assets_dir() / name).iterdir():
            assert (folder / name / f.name).read_bytes() == f.read_bytes(), f"{name}/{f.name}"

    pipe = PixArtAlphaPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    other = PixArtAlphaPipeline.from_pretrained(tmp_path / "from-ckpt", local_files_only=True,
                                                dtype=torch.float32)
    for (k, v), (_, w) in zip(pipe.transformer.state_dict().items(), other.transformer.state_dict().items()):
        torch.testing.assert_close(v, w, msg=k)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae_scale_factor == 4
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle", "the word SUN"], num_inference_steps=2, guidance_scale=4.5, output_type="np",
                  max_sequence_length=24, use_resolution_binning=False,
                  generator=torch.Generator("cpu").manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


def test_cli_exit_codes(tmp_path, capsys):
    assert toy_dit.main(["train", "--recipe", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert toy_dit.main(["export", "--teacher", str(tmp_path / "nothing")]) == 2
    assert "no pipeline/" in capsys.readouterr().err
