"""check_scheduler_steps finds out by running the scheduler whether a step count works (issue 12)."""

from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, PNDMScheduler

from aptp.errors import AptpUserError
from aptp.schedulers import check_model_steps, check_scheduler_steps, dry_run, scheduler_for_model

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
          prediction_type="v_prediction", set_alpha_to_one=False)


def test_pndm_with_prk_steps_needs_four_steps_and_ddim_is_offered():
    pndm = PNDMScheduler(**SD, skip_prk_steps=False)
    assert "broadcast" in dry_run(pndm, 2)
    with pytest.raises(AptpUserError) as info:
        check_scheduler_steps(pndm, 2)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("--steps 2: the pndm scheduler (PNDMScheduler) cannot run 2 denoising steps")
    assert "use --steps 4 or more" in msg and "--set generate.scheduler=ddim" in msg
    for n in (4, 5, 25):
        check_scheduler_steps(pndm, n)  # no error


def test_the_check_leaves_the_scheduler_untouched():
    pndm = PNDMScheduler(**SD, skip_prk_steps=True)
    pndm.set_timesteps(7)
    before = pndm.timesteps.clone()
    check_scheduler_steps(pndm, 25)
    assert pndm.timesteps.tolist() == before.tolist() and pndm.num_inference_steps == 7


def test_skip_prk_pndm_runs_one_and_two_steps():
    pndm = PNDMScheduler(**SD, skip_prk_steps=True)  # SD 2.1's own PNDM config
    for n in (1, 2, 3):
        check_scheduler_steps(pndm, n)


def test_too_many_steps_names_the_largest_that_works():
    pndm = PNDMScheduler(**SD, skip_prk_steps=True)
    with pytest.raises(AptpUserError, match=r"--steps 1000: the pndm .* use --steps 999 or fewer"):
        check_scheduler_steps(pndm, 1000)
    ddim = DDIMScheduler(**SD)
    with pytest.raises(AptpUserError, match=r"more than its 1000 training timesteps\); use --steps 999 or fewer$"):
        check_scheduler_steps(ddim, 1001)  # no scheduler is offered: none runs 1001
    with pytest.raises(AptpUserError, match="at least 1"):
        check_scheduler_steps(ddim, 0)


def test_the_models_scheduler_is_read_from_its_config(tmp_path):
    toy = scheduler_for_model("toy", "pndm")
    assert isinstance(toy, PNDMScheduler) and toy.config.prediction_type == "v_prediction"
    assert isinstance(scheduler_for_model("toy", "ddim"), DDIMScheduler)
    check_model_steps("toy", "pndm", 2)
    with pytest.raises(AptpUserError, match="--steps 1000: the pndm scheduler"):
        check_model_steps("toy", "pndm", 1000)
    # nothing at hand (a bare folder, an uncached hub id): not checked up front
    assert scheduler_for_model(str(tmp_path), "pndm") is None
    assert scheduler_for_model("no-such-org/no-such-model", "pndm") is None
