"""`aptp eval --save-embeddings`: a target's per-image features saved, and given back as a target,
score exactly as its images did (values, intervals, paired differences), on a prefix of its
captions too; and every file that does not fit the evaluation is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from aptp.cli.main import app

pytestmark = pytest.mark.integration

N = 8


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real validation images, a blurred copy of them (a worse "model") and a domain CLIP."""
    from aptp.data.shapes_world import export_image_folder
    from aptp.models.toy import build_domain_clip, save_domain_clip

    root = tmp_path_factory.mktemp("embeddings")
    export_image_folder(root / "real", "validation", N)
    blurred = root / "blurred"
    blurred.mkdir()
    for line in (root / "real" / "metadata.jsonl").read_text().splitlines():
        r = json.loads(line)
        Image.open(root / "real" / r["file_name"]).filter(ImageFilter.GaussianBlur(3)).save(blurred / r["file_name"])
    (blurred / "metadata.jsonl").write_text((root / "real" / "metadata.jsonl").read_text())
    for seed in (0, 1):
        save_domain_clip(build_domain_clip(seed), root / f"clip{seed}", torch.float32)
    return root


def evaluate(world: Path, *targets, limit=N, clip=0, extra=()):
    res = cli("eval", *targets, "--limit", limit, "--format", "json", "--quiet",
              "--set", f"eval.clip_model=domain-clip:{world / f'clip{clip}'}",
              "--set", "eval.bootstrap=100", "--set", "eval.bootstrap_sets=20", *extra)
    return res


def scores(rows):
    keep = ("fid", "clip", "cmmd", "bootstrap", "per_image", "clip_easy", "clip_medium", "clip_hard", "clip_hardest")
    out = [{k: r[k] for k in keep if k in r} for r in rows]
    for r in out:  # the reference is named as given: a folder once, a file after
        r["bootstrap"] = {k: v for k, v in r["bootstrap"].items() if k != "reference"}
    return out


def test_saved_embeddings_score_as_the_images(world, tmp_path):
    first = evaluate(world, world / "blurred", world / "real", extra=("--output", tmp_path / "e1", "--save-embeddings"))
    assert first.exit_code == 0, first.output
    rows = json.loads(first.stdout)
    files = sorted((tmp_path / "e1" / "embeddings").glob("*.safetensors"))
    assert [f.name for f in files] == ["blurred.safetensors", "real.safetensors"]
    assert rows[0]["fid"] > rows[1]["fid"] + 1e-3  # the blur is a real difference, so the check below is not vacuous
    emb = [tmp_path / "e1" / "embeddings" / f"{n}.safetensors" for n in ("blurred", "real")]

    again = evaluate(world, *emb)
    assert again.exit_code == 0, again.output
    back = json.loads(again.stdout)
    assert scores(back) == scores(rows)  # bit for bit: float64 features, the same bootstrap draws
    assert [r["kind"] for r in back] == ["embeddings", "embeddings"]
    assert [r["source"] for r in back] == [str(world / "blurred"), str(world / "real")]
    assert back[1]["bootstrap"]["reference"] == str(emb[0])

    # paired with a target scored from images, referenced either way
    mixed = evaluate(world, world / "real", emb[0], extra=("--reference", emb[0]))
    assert mixed.exit_code == 0, mixed.output
    m = json.loads(mixed.stdout)
    d_first = rows[1]["bootstrap"]["metrics"]["clip"]
    assert m[0]["bootstrap"]["metrics"]["clip"]["delta"] == pytest.approx(d_first["delta"], abs=1e-12)
    assert m[0]["bootstrap"]["metrics"]["fid"]["delta"] == pytest.approx(rows[1]["bootstrap"]["metrics"]["fid"]["delta"])

    # the first 4 captions of an 8-image file score as the first 4 images
    four = json.loads(evaluate(world, emb[0], limit=4).stdout)
    direct = json.loads(evaluate(world, world / "blurred", limit=4).stdout)
    assert scores(four) == scores(direct)


def test_files_that_do_not_fit_are_one_line(world, tmp_path):
    res = evaluate(world, world / "blurred", extra=("--output", tmp_path / "e", "--save-embeddings"))
    assert res.exit_code == 0, res.output
    emb = tmp_path / "e" / "embeddings" / "blurred.safetensors"
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(emb.read_bytes()[:100])
    cases = [
        (evaluate(world, emb, limit=N + 1), "holds 8 images"),
        (evaluate(world, emb, clip=1), "features from"),
        (evaluate(world, emb, extra=("--set", "eval.resolution=128")), "scored at 256px"),
        (evaluate(world, emb, extra=("--set", "eval.split=train")), "scored on other captions"),
        (evaluate(world, other), "not an `aptp eval --save-embeddings` file"),
        (evaluate(world, damaged), "not a readable safetensors file"),
        (evaluate(world, world / "real", extra=("--save-embeddings",)), "--save-embeddings writes into --output"),
        (evaluate(world, emb, extra=("--output", tmp_path / "e", "--overwrite")), "lies inside --output"),
    ]
    for res, needle in cases:
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert needle in lines[0], lines[0]
    assert emb.is_file()  # --overwrite refused: nothing deleted
