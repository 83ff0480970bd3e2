"""Taylor importance (``--method taylor``) with known answers on a tiny pipeline."""

from __future__ import annotations

import torch

from aptp.engine.baselines import importance_vector
from aptp.engine.macs import build_macs_model
from aptp.engine.space import build_space


def _setup(tiny_pipeline_dir):
    from aptp.data.registry import build_dataset
    from aptp.settings import DataSettings, ModelSettings
    from aptp.train.teacher import load_teacher

    teacher = load_teacher(ModelSettings(name=str(tiny_pipeline_dir)))
    data = build_dataset(DataSettings(name="shapes", resolution=16, max_samples=32), seed=0)
    return teacher, build_space(teacher.denoiser, ffn_groups=8), data


def test_a_unit_that_computes_nothing_scores_zero_and_the_vector_meets_the_budget(tiny_pipeline_dir):
    from aptp.train.taylor import stratified_timesteps, taylor_scores

    torch.set_num_threads(1)
    teacher, space, data = _setup(tiny_pipeline_dir)
    heads = next(s for s in space.segments if s.kind == "cross_attn_heads")
    attn = teacher.denoiser.get_submodule(heads.module)
    with torch.no_grad():  # head 1 contributes nothing: its to_out columns are zero
        attn.to_out[0].weight[:, heads.unit_width : 2 * heads.unit_width] = 0
    scores = taylor_scores(teacher, space, data, batches=2, batch_size=4, seed=0)
    assert torch.isnan(scores[space.depth_mask()]).all()
    assert scores[heads.offset + 1] == 0 and scores[heads.offset] > 0
    again = taylor_scores(teacher, space, data, batches=2, batch_size=4, seed=0)
    assert torch.equal(scores.nan_to_num(-1), again.nan_to_num(-1))  # deterministic under the seed
    macs = build_macs_model(teacher.denoiser, space, 4, teacher.text_len)
    v = importance_vector(space, macs, scores, 0.7)
    assert 0.6 < float(macs.ratio(v)[0]) <= 0.7 and v[heads.offset + 1] == 0
    t = stratified_timesteps(teacher.noise_scheduler, 10, torch.Generator().manual_seed(0))
    n = teacher.noise_scheduler.config.num_train_timesteps
    assert sorted((t // (n // 10)).tolist()) == list(range(10))  # one timestep per tenth of the schedule
