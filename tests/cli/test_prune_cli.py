"""`aptp prune` resolves what a user means: the headline command and model-derived defaults."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from aptp.cli.main import app


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1", **(env or {})})


def make_coco(tmp_path):
    from tests.unit.test_data import jpeg_bytes

    root = tmp_path / "coco"
    for split in ("train2014", "val2014"):
        (root / split).mkdir(parents=True)
        (root / split / f"COCO_{split}_000000000001.jpg").write_bytes(jpeg_bytes((200, 30, 30)))
    (root / "annotations").mkdir()
    for split in ("train2014", "val2014"):
        data = {"images": [{"id": 1, "file_name": f"COCO_{split}_000000000001.jpg", "height": 24, "width": 40}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "a red thing"}]}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root


def test_headline_command_runs_the_paper_recipe_on_sd21(tmp_path):
    """`aptp prune --data coco --budget 0.78 --experts 8` means the paper's COCO job on SD 2.1, not
    the shapes toy on COCO captions; offline it ends in one line saying how to get SD 2.1."""
    out = tmp_path / "run"
    res = invoke("prune", "--data", "coco", "--data-root", str(make_coco(tmp_path)), "--budget", "0.78",
                 "--experts", "8", "--output", str(out))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "using the paper recipe coco-base" in lines[0]
    assert lines[-1].startswith("error: stabilityai/stable-diffusion-2-1") and "hf download" in lines[-1]
    assert len(lines) == 2 and "Traceback" not in res.output
    # the settings it resolved are the recipe's, with the flags on top
    from aptp.settings import resolve_settings

    s = resolve_settings("coco-base", cli={"prune.budget": 0.78, "router.num_experts": 8}, env={})
    assert (s.model.name, s.data.resolution, s.space.macs_resolution) == ("sd2.1", 256, 768)


def test_a_chosen_model_or_recipe_is_not_replaced(tmp_path):
    from aptp.cli.prune import paper_recipe

    assert paper_recipe("coco", None, None, None) == "coco-base"
    assert paper_recipe("cc3m", None, None, []) == "cc3m-base"
    assert paper_recipe("coco", "toy", None, None) is None
    assert paper_recipe("coco", None, tmp_path / "r.yaml", None) is None
    assert paper_recipe("coco", None, None, ["model.name=toy"]) is None
    assert paper_recipe("shapes", None, None, None) is None and paper_recipe(None, None, None, None) is None
