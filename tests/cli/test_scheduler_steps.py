"""`aptp generate` / `aptp eval` with a step count the scheduler cannot run: one line, exit 2,
before anything is loaded or written (issue 12)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from aptp.cli.main import app

pytestmark = pytest.mark.integration


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def prk_run(tmp_path_factory):
    """A tiny run whose model samples with PNDM *with* its Runge-Kutta warm-up (skip_prk_steps
    false, PNDM's own default): that needs at least 4 steps."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from tests.conftest import make_tiny_unet, tiny_pipeline_parts

    root = tmp_path_factory.mktemp("prk")
    parts = tiny_pipeline_parts()
    parts["scheduler"] = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       skip_prk_steps=False, steps_offset=1, prediction_type="v_prediction")
    StableDiffusionPipeline(unet=make_tiny_unet(0, randomize=False), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False, **parts).save_pretrained(root / "pipe")
    run = root / "run"
    res = cli("prune", "--model", root / "pipe", "--resolution", "16", "--batch-size", "4", "--warmup-steps", "1",
              "--steps", "1", "--experts", "2", "--output", run, "--quiet", "--set", "data.max_samples=16",
              "--set", f"router.embedding_cache={root / 'emb'}")
    assert res.exit_code == 0, res.output
    assert cli("materialize", run, "--quiet").exit_code == 0
    return run


def one_error(res) -> str:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def test_generate_two_pndm_steps_is_one_line(prk_run, tmp_path):
    out = tmp_path / "samples"
    line = one_error(cli("generate", prk_run, "a red circle", "--steps", "2", "--output", out))
    assert line == ("error: --steps 2: the pndm scheduler (PNDMScheduler) cannot run 2 denoising steps "
                    "(ValueError: operands could not be broadcast together with shapes (4,) (8,)); "
                    "use --steps 4 or more, or another scheduler: --set generate.scheduler=ddim")
    assert not out.exists()
    # what the line suggests works
    res = cli("generate", prk_run, "a red circle", "--steps", "2", "--set", "generate.scheduler=ddim",
              "--output", tmp_path / "ddim")
    assert res.exit_code == 0, res.output
    res = cli("generate", prk_run, "a red circle", "--steps", "4", "--output", tmp_path / "pndm4")
    assert res.exit_code == 0, res.output


def test_eval_checks_the_steps_before_generating(prk_run, tmp_path):
    line = one_error(cli("eval", prk_run, "--limit", "2", "--steps", "3", "--metrics", "clip",
                         "--output", tmp_path / "eval"))
    assert "--steps 3: the pndm scheduler" in line and "use --steps 4 or more" in line
    assert not (tmp_path / "eval").exists()
