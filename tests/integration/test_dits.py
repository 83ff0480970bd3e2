"""Diffusion transformers end to end on tiny random pipelines, offline, through the CLI:
prune (2 steps) → materialize → finetune (2 steps) → generate, for PixArt-α (cross-attention DiT),
SD3 and Flux (MMDiT, flow matching); experts are the stock transformer classes, and a sliced
expert dropped into the stock pipeline as ``transformer=`` samples what the gated teacher samples.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from aptp.cli.main import app
from aptp.engine.backbones import supported_classes

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py

FAMILIES = ["pixart", "sd3", "flux"]
CLASSES = {"pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1"})




@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    from tests import tiny_dits

    family = request.param
    assert CLASSES[family] in supported_classes()
    build = getattr(tiny_dits, f"make_tiny_{family}_dir")
    return family, build(tmp_path_factory.mktemp(family) / "pipe", randomize_std=0.1)


def test_prune_materialize_finetune_generate(tiny, tmp_path):
    from aptp.engine.expert import load_expert

    family, info = tiny
    run = tmp_path / "run"
    res = cli("prune", "--model", str(info.path), "--data", "shapes", "--resolution", str(info.height),
              "--batch-size", "4", "--warmup-steps", "1", "--steps", "1", "--experts", "2", "--output", str(run),
              "--quiet", "--set", "data.max_samples=16", "--set", f"router.embedding_cache={tmp_path / 'emb'}",
              "--set", "prune.lr=0.05", "--set", "prune.lr_warmup_steps=1", "--set", "space.ffn_groups=8",
              "--set", "prune.log_every=1")
    assert res.exit_code == 0, res.output
    space = json.loads((run / "arch_space.json").read_text())
    assert space["meta"]["backbone"] == family
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    res = cli("materialize", str(run), "--quiet")
    assert res.exit_code == 0, res.output
    records = json.loads((run / "experts.json").read_text())["experts"]
    k = int(records[0]["expert"])
    assert type(load_expert(run / records[0]["path"])).__name__ == CLASSES[family]

    res = cli("finetune", str(run), "--expert", str(k), "--steps", "2", "--batch-size", "2", "--quiet",
              "--set", "finetune.log_every=1")
    assert res.exit_code == 0, res.output
    assert (run / "finetuned" / f"expert-{k}" / "model.safetensors").is_file()

    out = tmp_path / "images"
    res = cli("generate", str(run), "a red circle", "two blue squares", "--output", str(out), "--steps", "2",
              "--guidance", "3", "--quiet")
    assert res.exit_code == 0, res.output
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 2 and all((out / m["file"]).is_file() for m in manifest)
    assert manifest[0]["scheduler"] == "default"  # the DiT profile keeps the pipeline's sampler


def test_sliced_expert_in_the_stock_pipeline_equals_the_gated_teacher(tiny):
    import diffusers

    from aptp.engine.gates import Gates
    from aptp.engine.slicing import slice_model
    from aptp.engine.space import build_space
    from aptp.generate import initial_latents

    family, info = tiny
    pipe = getattr(diffusers, info.pipeline).from_pretrained(info.path)
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe.transformer
    space = build_space(teacher, ffn_groups=8)
    g = torch.Generator().manual_seed(5)
    v = (torch.rand(space.size, generator=g) > 0.3).float()
    depth = [s for s in space.segments if s.kind == "depth"]
    v[depth[0].offset] = 0  # a dropped block
    expert, plan = slice_model(teacher, space, v)
    assert any(op["op"] == "skip" for op in plan.ops)
    latents = initial_latents(pipe, 0, info.height, info.width)
    kw = dict(num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="pt", **info.call_kwargs)
    gates = Gates(teacher, space)
    try:
        with gates.apply(v):
            gated = pipe("a red circle", **kw).images
    finally:
        gates.remove()
    full = pipe("a red circle", **kw).images
    pipe.transformer = expert
    sliced = pipe("a red circle", **kw).images
    torch.testing.assert_close(sliced, gated, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sliced, full, atol=1e-3)


def test_inspect_model_on_the_folder(tiny):
    from aptp.engine.macs import count_macs
    from aptp.models.registry import build_unet, default_text_len, resolve_model

    family, info = tiny
    res = cli("inspect-model", "--model", str(info.path), "--resolution", str(info.height), "--format", "json",
              "--set", "space.ffn_groups=8")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    ref = resolve_model(str(info.path))
    assert report["text_len"] == default_text_len(ref) == info.text_len
    counted = count_macs(build_unet(ref), info.height // 2, text_len=report["text_len"]) / 1e9
    assert abs(report["gmacs"] - counted) <= 1e-6 * counted
