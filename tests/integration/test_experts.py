"""Experts end to end on a tiny pipeline: materialize → route → finetune → generate."""

from __future__ import annotations

import json
import math
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from aptp.cli.main import app
from aptp.engine.expert import load_expert, read_plan

pytestmark = pytest.mark.integration


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1"}, input=input)


@pytest.fixture(scope="module")
def run(tiny_pipeline_dir, tmp_path_factory):
    """A pruned and materialized tiny run (shared by the tests below)."""
    root = tmp_path_factory.mktemp("experts")
    run = root / "run"
    res = cli("prune", "--model", str(tiny_pipeline_dir), "--resolution", "16", "--batch-size", "8",
              "--warmup-steps", "2", "--steps", "6", "--experts", "4", "--output", str(run), "--quiet",
              "--set", "data.max_samples=64", "--set", f"router.embedding_cache={root / 'emb'}",
              "--set", "prune.lr=0.5", "--set", "prune.lr_warmup_steps=1", "--set", "prune.budget=0.5")
    assert res.exit_code == 0, res.output
    res = cli("materialize", str(run), "--quiet")
    assert res.exit_code == 0, res.output
    return run


def test_materialized_experts_start_from_teacher_weights(run, tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    experts = json.loads((run / "experts.json").read_text())["experts"]
    assert len(experts) == 4 and abs(sum(e["share"] for e in experts) - 1) < 1e-9
    for e in experts:
        path = run / e["path"]
        expert = load_expert(path)
        plan = read_plan(path)
        t_state, e_state = teacher.state_dict(), expert.state_dict()
        for op in plan.ops:
            if op["op"] != "resnet_channels" or not op["keep"]:
                continue
            w = op["unit_width"]
            ch = torch.tensor([u * w + c for u in op["keep"] for c in range(w)])
            key = op["module"] + ".conv1.weight"
            assert torch.equal(e_state[key], t_state[key][ch])
        # every tensor the plan does not touch is the teacher's, bit for bit
        touched = {op["module"] for op in plan.ops}
        for key, val in e_state.items():
            if key in t_state and not any(key.startswith(m + ".") for m in touched):
                assert torch.equal(val, t_state[key]), key
        assert e["params"] <= sum(p.numel() for p in teacher.parameters())


def test_route_from_stdin_jsonl_and_formats(run):
    res = cli("route", str(run), "--prompts", "-", "--format", "jsonl",
              input="a red circle\nthe word SUN in white letters\n")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle", "the word SUN in white letters"]
    assert all(0 <= r["expert"] < 4 and 0 < r["macs_ratio"] <= 1 and -1 <= r["similarity"] <= 1 for r in rows)
    csv_out = cli("route", str(run), "a red circle", "--format", "csv")
    assert csv_out.exit_code == 0 and csv_out.stdout.splitlines()[0] == "prompt,expert,macs_ratio,similarity"
    # piped (no terminal, no COLUMNS): the table is not squeezed into 80 columns with cut cells
    long = "the word SUN in white letters on a black background"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"HF_HUB_OFFLINE": "1"}
    table = subprocess.run([sys.executable, "-m", "aptp", "route", str(run), "a red circle", long, "--format", "table"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and long in table.stdout, table.stdout + table.stderr
    # routing of a prompt does not depend on its batch or position
    prompts = [f"a {c} square" for c in ("red", "blue", "green", "yellow")] * 16
    batch = cli("route", str(run), *prompts)
    alone = cli("route", str(run), prompts[5])
    assert json.loads(batch.stdout.splitlines()[5])["expert"] == json.loads(alone.stdout)["expert"]
    assert cli("route", str(run)).exit_code == 2  # no prompts: one line, exit 2


def test_route_data_writes_index_files(run):
    res = cli("route", str(run), "--data")
    assert res.exit_code == 0, res.output
    files = sorted((run / "routes" / "train").glob("expert-*.json"))
    assert len(files) == 4
    total = sum(len(json.loads(f.read_text())["indices"]) for f in files)
    assert total == 64
    assert cli("route", str(run), "--data").exit_code == 2  # never overwritten silently


def test_finetune_two_steps_changes_weights(run):
    experts = json.loads((run / "experts.json").read_text())["experts"]
    k = max(experts, key=lambda e: e["prompts"])["expert"]
    before = load_expert(run / "experts" / f"expert-{k}").state_dict()
    res = cli("finetune", str(run), "--expert", str(k), "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--set", "finetune.log_every=1",
              "--quiet")
    assert res.exit_code == 0, res.output
    after = load_expert(run / "finetuned" / f"expert-{k}").state_dict()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert len(changed) > len(before) // 2
    # the materialized expert stays as it was
    assert all(torch.equal(v, load_expert(run / "experts" / f"expert-{k}").state_dict()[key])
               for key, v in before.items())
    rows = [json.loads(x) for x in (run / "finetune" / f"expert-{k}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    again = cli("finetune", str(run), "--expert", str(k), "--steps", "2", "--quiet")
    assert again.exit_code == 2  # existing result is not overwritten without --overwrite
    assert cli("finetune", str(run), "--expert", "9").exit_code == 2


def test_finetune_caption_dropout_and_min_snr(run, tmp_path):
    """finetune.caption_dropout and finetune.snr_gamma change the step-1 loss of the same samples."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("finetune", "finetuned"))
    experts = json.loads((copy / "experts.json").read_text())["experts"]
    k = max(experts, key=lambda e: e["prompts"])["expert"]
    losses = {}
    for name, extra in (("base", ["--set", "finetune.caption_dropout=0"]),
                        ("dropout", ["--set", "finetune.caption_dropout=0.9"]),
                        ("snr", ["--set", "finetune.caption_dropout=0", "--set", "finetune.snr_gamma=5"])):
        res = cli("finetune", str(copy), "--expert", str(k), "--steps", "1", "--batch-size", "4", "--overwrite",
                  "--set", "finetune.log_every=1", "--quiet", *extra)
        assert res.exit_code == 0, res.output
        row = json.loads((copy / "finetune" / f"expert-{k}" / "metrics.jsonl").read_text().splitlines()[0])
        losses[name] = row["loss"]
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["dropout"] != pytest.approx(losses["base"], rel=1e-4)
    assert losses["snr"] != pytest.approx(losses["base"], rel=1e-4)


def test_finetune_with_cached_latents_trains_the_same(run, tmp_path, monkeypatch):
    """data.cache_latents in fine-tuning: the posteriors come from the cache (every step reads it),
    the losses are the VAE path's to rounding."""
    from aptp.train.latents import LatentCache

    calls = []
    lookup = LatentCache.lookup
    monkeypatch.setattr(LatentCache, "lookup", lambda self, index: calls.append(len(index)) or lookup(self, index))
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("finetune", "finetuned"))
    experts = json.loads((copy / "experts.json").read_text())["experts"]
    k = max(experts, key=lambda e: e["prompts"])["expert"]
    losses = {}
    for name, extra in (("vae", []), ("cached", ["--set", "data.cache_latents=true",
                                                 "--set", f"data.latent_cache_dir={tmp_path / 'latents'}"])):
        res = cli("finetune", str(copy), "--expert", str(k), "--steps", "3", "--batch-size", "4", "--overwrite",
                  "--set", "finetune.log_every=1", "--quiet", *extra)
        assert res.exit_code == 0, res.output
        rows = (copy / "finetune" / f"expert-{k}" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(x)["loss"] for x in rows]
    assert calls == [4, 4, 4]
    assert losses["cached"] == pytest.approx(losses["vae"], rel=1e-4)
    # with the cache built, the loop reads captions and indices only: one image drawn (the size probe), not 3 x 4
    import aptp.data.shapes_world as world

    drawn = []
    render = world.render
    monkeypatch.setattr(world, "render", lambda *a, **k: drawn.append(1) or render(*a, **k))
    res = cli("finetune", str(copy), "--expert", str(k), "--steps", "3", "--batch-size", "4", "--overwrite",
              "--quiet", *extra)
    assert res.exit_code == 0, res.output
    assert len(drawn) == 1


def test_finetune_split_steps_share_one_total(run, tmp_path):
    """finetune.steps_mode=split: `steps` in all, shared by routed samples (equal total compute)."""
    from aptp.rundir import RunDir
    from aptp.train.finetune import expert_steps, routed_indices

    rd = RunDir(run)
    counts = {e["expert"]: len(routed_indices(rd, e["expert"], True, lambda: None)) for e in rd.experts()}
    base = rd.settings
    split = base.model_copy(update={"finetune": base.finetune.model_copy(update={"steps": 40, "steps_mode": "split"})})
    per = base.model_copy(update={"finetune": base.finetune.model_copy(update={"steps": 40})})
    assert expert_steps(rd, per) == {k: 40 for k in counts}
    steps = expert_steps(rd, split)
    assert sum(steps.values()) == 40
    for k in counts:  # proportional to the routed samples, within one step of the exact share
        assert abs(steps[k] - 40 * counts[k] / sum(counts.values())) < 1 + 1e-9
        assert (steps[k] == 0) == (counts[k] == 0)
    live = sum(1 for c in counts.values() if c)
    too_few = split.model_copy(update={"finetune": split.finetune.model_copy(update={"steps": live - 1})})
    with pytest.raises(Exception, match="fewer steps"):
        expert_steps(rd, too_few)
    # through the CLI: the per-expert runs add up to the total
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("finetune", "finetuned"))
    res = cli("finetune", str(copy), "--steps", str(live + 1), "--batch-size", "2", "--quiet",
              "--set", "finetune.steps_mode=split")
    assert res.exit_code == 0, res.output
    done = [json.loads((copy / "finetune" / f"expert-{k}" / "result.json").read_text())["step"]
            for k in counts if counts[k]]
    assert sum(done) == live + 1 and min(done) >= 1


def test_generate_mixed_batch_equals_alone(run, tmp_path):
    prompts = ["a red circle", "the word SUN in white letters on a black background",
               "two green triangles left of a yellow star", "a small blue square in the top left",
               "a purple heart", "a large orange star"]
    res = cli("generate", str(run), *prompts, "--output", str(tmp_path / "mix"), "--steps", "3",
              "--guidance", "3", "--batch-size", "4", "--weights", "initial", "--quiet")
    assert res.exit_code == 0, res.output
    manifest = [json.loads(x) for x in (tmp_path / "mix" / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == prompts and [m["seed"] for m in manifest] == list(range(6))
    assert len({m["expert"] for m in manifest}) >= 1
    i = 3
    alone = cli("generate", str(run), prompts[i], "--seed", str(i), "--output", str(tmp_path / "alone"),
                "--steps", "3", "--guidance", "3", "--weights", "initial", "--quiet")
    assert alone.exit_code == 0, alone.output
    a = np.asarray(Image.open(tmp_path / "mix" / manifest[i]["file"]), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "alone" / "00000.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # fp32 differences across batch shapes, at most one 8-bit level
    full = cli("generate", str(run), prompts[0], "--full", "--output", str(tmp_path / "full"), "--steps", "2",
               "--quiet")
    assert full.exit_code == 0 and json.loads((tmp_path / "full" / "manifest.jsonl").read_text())["expert"] == "full"
    # an existing output folder is not overwritten
    assert cli("generate", str(run), prompts[0], "--output", str(tmp_path / "mix"), "--quiet").exit_code == 2


def test_finetune_all_skips_experts_without_prompts(run, tmp_path):

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("finetune", "finetuned"))
    assert cli("route", str(copy), "--data", "--overwrite").exit_code == 0
    routes = copy / "routes" / "train"
    empty = json.loads((routes / "expert-1.json").read_text())
    empty["indices"] = []
    (routes / "expert-1.json").write_text(json.dumps(empty))  # as if the router sent nothing there
    n = len(json.loads((copy / "experts.json").read_text())["experts"])
    res = cli("finetune", str(copy), "--steps", "1", "--batch-size", "2", "--quiet")
    assert res.exit_code == 0, res.output
    assert "expert 1: skipped" in res.stdout
    done = sorted(p.name for p in (copy / "finetuned").iterdir())
    with_prompts = [k for k in range(n) if json.loads((routes / f"expert-{k}.json").read_text())["indices"]]
    assert 1 not in with_prompts and done == [f"expert-{k}" for k in with_prompts]
    # naming the empty expert explicitly is still an error
    assert cli("finetune", str(copy), "--expert", "1", "--steps", "1", "--quiet").exit_code == 2


def test_finetune_data_override_routes_the_data_it_trains_on(run, tmp_path):
    """`--set data.max_samples=…` at fine-tune time: the route index is built from the same data
    settings as the dataset that reads it (issue 12: it was built from the run's saved ones)."""

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("finetune", "finetuned", "routes"))
    res = cli("finetune", str(copy), "--expert", "all", "--steps", "1", "--batch-size", "2", "--quiet",
              "--set", "data.max_samples=20")
    assert res.exit_code == 0, res.output
    own = copy / "routes" / "train"
    assert not own.exists()  # the run's own index (64 samples) was not written for other data
    (other,) = [d for d in (copy / "routes").iterdir() if d.name.startswith("train-")]
    files = [json.loads(f.read_text()) for f in sorted(other.glob("expert-*.json"))]
    indices = sorted(i for f in files for i in f["indices"])
    assert indices == list(range(20))  # every sample of the overridden data set, none beyond it
    assert all(f["data_identity"]["max_samples"] == 20 for f in files)
    # without the override the run's own index is used (and written where `aptp route --data` puts it)
    res = cli("finetune", str(copy), "--expert", "all", "--steps", "1", "--batch-size", "2", "--quiet",
              "--overwrite")
    assert res.exit_code == 0, res.output
    total = sum(len(json.loads(f.read_text())["indices"]) for f in own.glob("expert-*.json"))
    assert total == 64


def test_interrupted_generate_keeps_finished_images_and_lines(run, tmp_path):
    from aptp.generate import generate
    from aptp.rundir import RunDir
    from aptp.settings import GenerateSettings

    prompts = [f"a red circle number {i}" for i in range(6)]
    calls = {"n": 0}

    def stop_after_first_batch(n: int) -> None:  # as if Ctrl-C arrived after batch 1
        calls["n"] += 1
        raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        generate(RunDir(run), prompts, out, GenerateSettings(steps=2, guidance=3, batch_size=2),
                 expert=0, weights="initial", on_batch=stop_after_first_batch)
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert calls["n"] == 1 and [m["index"] for m in lines] == [0, 1]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"]
    for m in lines:
        Image.open(out / m["file"]).verify()


def test_bad_input_is_one_line_and_exit_2(run, tmp_path):

    no_codes = tmp_path / "no-codes"
    shutil.copytree(run, no_codes, ignore=shutil.ignore_patterns("finetune", "finetuned", "experts"))
    (no_codes / "codes.safetensors").unlink()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (("route", str(no_codes), "a red circle"), "codes.safetensors"),
        (("materialize", str(no_codes)), "codes.safetensors"),
        (("generate", str(no_codes), "a red circle", "--output", str(tmp_path / "g1")), "codes.safetensors"),
        (("generate", str(run), "a red circle", "--expert", "9", "--output", str(tmp_path / "g2")), "--expert 9"),
        (("generate", str(run), "--prompts", str(empty), "--output", str(tmp_path / "g3")), "no prompts"),
        (("route", str(run), "--prompts", str(empty)), "no prompts"),
        (("finetune", str(run), "--expert", "9"), "--expert 9"),
    ]
    for args, needle in cases:
        res = cli(*args)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, res.stderr)
        assert lines[0].startswith("error:")


def test_eval_side_by_side(run, tiny_pipeline_dir, tmp_path):
    """`aptp eval` on the mixture, the teacher and a folder of generated images, one table."""
    from aptp.models.toy import build_domain_clip, save_domain_clip

    clip_dir = tmp_path / "clip"
    save_domain_clip(build_domain_clip(0), clip_dir, torch.float32)
    gen = cli("generate", str(run), "--prompts", "-", "--output", str(tmp_path / "gen"), "--steps", "2", "--quiet",
              input="\n".join(_validation_captions(run, 4)) + "\n")
    assert gen.exit_code == 0, gen.output
    from aptp.data.shapes_world import export_image_folder

    export_image_folder(tmp_path / "real", "validation", 4)  # an imagefolder (metadata.jsonl) target
    res = cli("eval", str(run), str(tiny_pipeline_dir), str(tmp_path / "gen"), str(tmp_path / "real"), f"{run}@initial",
              "--limit", "4", "--steps", "2", "--reference", str(tiny_pipeline_dir),
              "--output", str(tmp_path / "eval"), "--format", "json", "--quiet",
              "--set", f"eval.clip_model=domain-clip:{clip_dir}", "--set", "eval.bootstrap=200",
              "--set", "eval.bootstrap_sets=30")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    # 95% bootstrap intervals per target and metric, paired differences from the reference (the teacher)
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == rows
    for r in rows:
        boot = r["bootstrap"]
        assert boot["reference"] == str(tiny_pipeline_dir) and boot["resamples"] == 200
        assert set(boot["metrics"]) == {"fid", "clip", "cmmd"} and len(r["per_image"]["clip"]) == 4
        # per-prompt means take every draw; the set statistics (FD, CMMD) the first bootstrap_sets
        assert [boot["metrics"][m]["resamples"] for m in ("clip", "fid", "cmmd")] == [200, 30, 30]
        assert r["clip"] == pytest.approx(sum(r["per_image"]["clip"]) / 4)
        for m, b in boot["metrics"].items():
            assert b["value"] == r[m] and b["ci95"][0] <= b["ci95"][1]
            # FD / CMMD: the draws' repeated-image bias taken out before the quantiles are read
            assert ("bootstrap_bias" in b) == (m in ("fid", "cmmd"))
            assert b["delta"] == pytest.approx(r[m] - rows[1][m])
            assert b["delta_ci95"][0] <= b["delta_ci95"][1]
    assert all(b["delta"] == 0 and b["delta_ci95"] == [0, 0] for b in rows[1]["bootstrap"]["metrics"].values())
    # the run's own images and `aptp generate`'s folder of them: same prompts, same seeds, same images
    assert rows[2]["bootstrap"]["metrics"]["clip"]["delta_ci95"] == pytest.approx(
        rows[0]["bootstrap"]["metrics"]["clip"]["delta_ci95"], abs=1.0)
    header = (tmp_path / "eval" / "results.csv").read_text().splitlines()[0].split(",")
    assert {"reference", "clip_ci95_lo", "clip_ci95_hi", "clip_delta", "clip_delta_ci95_lo", "fid_delta_ci95_hi",
            "fid_bootstrap_bias"} <= set(header)
    assert [r["kind"] for r in rows] == ["run", "model", "images", "images", "run"]
    assert rows[4]["target"] == f"{run}@initial" and rows[4]["macs_ratio"] == rows[0]["macs_ratio"]
    rows = rows[:4]
    assert rows[3]["fid"] < min(r["fid"] for r in rows[:3])  # real images (64 px) vs the 16 px reference
    for r in rows:
        assert r["n_images"] == 4 and r["fid"] >= 0 and 0 <= r["clip"] <= 100 and "cmmd" in r
        assert any(k in r for k in ("clip_easy", "clip_medium", "clip_hard", "clip_hardest"))
    assert rows[1]["macs_ratio"] == 1.0 and 0 < rows[0]["macs_ratio"] <= 1
    assert rows[0]["seconds_per_image"] > 0 and rows[2]["seconds_per_image"] is None
    # unset guidance: the model's recommended scale (a local folder: 7.5), recorded per row
    assert [r["guidance"] for r in rows] == [7.5, 7.5, 7.5, None]
    # the generated folder holds the same routed images as the run's own generation
    assert rows[2]["clip"] == pytest.approx(rows[0]["clip"], abs=1.0)
    assert (tmp_path / "eval" / "results.csv").is_file() and (tmp_path / "eval" / "results.json").is_file()
    saved = sorted((tmp_path / "eval" / "images" / run.name).glob("*.png"))  # generated, kept at full size
    assert [p.name for p in saved] == [f"{i:05d}.png" for i in range(4)]
    assert Image.open(saved[0]).size == (Image.open(tmp_path / "gen" / "00000.png").size)
    for target in (tmp_path / "nothing-here", f"{tmp_path / 'nothing-here'}@initial"):
        bad = cli("eval", str(target), "--limit", "2")
        assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = cli("eval", str(tmp_path / "gen"), "--reference", str(tmp_path / "real"), "--limit", "2")
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--reference" in bad.stderr, bad.stderr
    # the table: each metric with its interval, a Δ column per metric, "ref" on the reference row
    table = cli("eval", str(tmp_path / "gen"), str(tmp_path / "real"), "--limit", "4", "--reference", str(tmp_path / "real"),
                "--quiet", "--set", f"eval.clip_model=domain-clip:{clip_dir}", "--set", "eval.bootstrap=50")
    assert table.exit_code == 0, table.output
    assert "Δ CLIP" in table.stdout and "ref" in table.stdout and "95% bootstrap interval" in table.stdout, table.stdout
    off = cli("eval", str(tmp_path / "real"), "--limit", "4", "--format", "json", "--quiet",
              "--set", f"eval.clip_model=domain-clip:{clip_dir}", "--set", "eval.bootstrap=0")
    assert off.exit_code == 0 and "bootstrap" not in json.loads(off.stdout)[0], off.output


def _validation_captions(run, n):
    from aptp.data import build_dataset
    from aptp.settings import load_settings

    s = load_settings(run)
    return build_dataset(s.data, split="validation").captions()[:n]
