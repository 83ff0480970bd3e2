"""Known answers of the bootstrap intervals and paired differences of `aptp eval`."""

from __future__ import annotations

import pytest
import torch

from aptp.metrics import GaussianStats, cmmd, frechet_distance
from aptp.metrics.bootstrap import (
    bootstrap_distribution,
    cmmd_statistic,
    fd_statistic,
    mean_statistic,
    paired_summary,
    percentile_interval,
    resample_indices,
    summary,
)


def _scores(n: int, seed: int) -> torch.Tensor:
    return 70 + 5 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_targets_have_zero_delta_and_zero_width():
    scores = _scores(200, 0)
    idx = resample_indices(200, 500, seed=1)
    a = bootstrap_distribution(mean_statistic(scores), idx)
    b = bootstrap_distribution(mean_statistic(scores.clone()), idx)
    p = paired_summary(float(scores.mean()), float(scores.mean()), a, b)
    assert p["delta"] == 0 and p["delta_ci95"] == [0.0, 0.0]
    lo, hi = summary(float(scores.mean()), a)["ci95"]
    assert lo < float(scores.mean()) < hi  # the unpaired interval has width, the paired one does not


def test_constant_shift_gives_delta_c_and_excludes_zero():
    c = 0.3
    base = _scores(100, 2)  # per-prompt spread (sd 5) far larger than the shift
    shifted = base + c
    idx = resample_indices(100, 1000, seed=0)
    da = bootstrap_distribution(mean_statistic(shifted), idx)
    db = bootstrap_distribution(mean_statistic(base), idx)
    p = paired_summary(float(shifted.mean()), float(base.mean()), da, db)
    assert p["delta"] == pytest.approx(c)
    lo, hi = p["delta_ci95"]
    assert 0 < lo <= c <= hi and hi - lo < 1e-9  # a constant shift: every draw differs by exactly c
    # unpaired, the two intervals overlap: only the pairing shows the difference
    assert summary(0, da)["ci95"][0] < summary(0, db)["ci95"][1]


def test_noisy_paired_shift_excludes_zero():
    base = _scores(300, 3)
    other = base + 1.0 + 0.5 * torch.randn(300, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    idx = resample_indices(300, 1000, seed=5)
    p = paired_summary(float(other.mean()), float(base.mean()),
                       bootstrap_distribution(mean_statistic(other), idx),
                       bootstrap_distribution(mean_statistic(base), idx))
    lo, hi = p["delta_ci95"]
    assert 0 < lo < p["delta"] < hi


def test_interval_of_a_mean_covers_the_true_mean():
    # 40 simulated studies of 100 prompts each (true mean 70): a 95% interval misses rarely
    covered = 0
    for k in range(40):
        x = _scores(100, 100 + k)
        lo, hi = percentile_interval(bootstrap_distribution(mean_statistic(x), resample_indices(100, 300, seed=k)))
        covered += lo <= 70 <= hi
        assert hi - lo == pytest.approx(2 * 1.96 * 5 / 10, rel=0.35)  # about the normal-theory width
    assert covered >= 34


def test_fd_and_cmmd_intervals_contain_the_point_value():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(200, 4, generator=g, dtype=torch.float64) * 1.2 + 0.8
    idx = resample_indices(200, 200, seed=0)
    stats = GaussianStats.from_features(real, keep_features=True)
    fd = frechet_distance(stats, fake)
    assert fd_statistic(stats, fake)(torch.arange(200)) == pytest.approx(fd)
    lo, hi = summary(fd, bootstrap_distribution(fd_statistic(stats, fake), idx), centre=True)["ci95"]
    assert 0 < lo < fd < hi
    # normalised embeddings, as CMMD uses
    real_e, fake_e = torch.nn.functional.normalize(real, dim=-1), torch.nn.functional.normalize(fake, dim=-1)
    for estimator in ("unbiased", "biased"):
        point = cmmd(real_e, fake_e, estimator=estimator)
        stat = cmmd_statistic(real_e, fake_e, estimator=estimator)
        assert stat(torch.arange(200)) == pytest.approx(point)
        lo, hi = summary(point, bootstrap_distribution(stat, idx), centre=True)["ci95"]
        assert lo < point < hi


def test_fd_and_cmmd_intervals_hold_the_value_in_many_dimensions():
    """64-d features, 150 images: repeated images in a draw pull every resampled FD / CMMD far
    above the full set's (the plain percentile interval misses the value); the centred interval
    holds it, with the plain one's width, and reports the shift."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 64, generator=g, dtype=torch.float64)
    fake = torch.randn(150, 64, generator=g, dtype=torch.float64) * 1.05 + 0.1
    idx = resample_indices(150, 200, seed=0)
    stats = GaussianStats.from_features(real, keep_features=True)
    real_e, fake_e = torch.nn.functional.normalize(real, dim=-1), torch.nn.functional.normalize(fake, dim=-1)
    for point, stat in ((frechet_distance(stats, fake), fd_statistic(stats, fake)),
                        (cmmd(real_e, fake_e), cmmd_statistic(real_e, fake_e))):
        d = bootstrap_distribution(stat, idx)
        plain, centred = summary(point, d), summary(point, d, centre=True)
        assert plain["ci95"][0] > point  # the resampling bias, larger than the spread
        lo, hi = centred["ci95"]
        assert lo < point < hi
        assert hi - lo == pytest.approx(plain["ci95"][1] - plain["ci95"][0])
        assert centred["bootstrap_bias"] == pytest.approx(float(d.mean()) - point) and centred["bootstrap_bias"] > 0
        # paired against itself shifted by a constant: delta exact, interval centred on it
        p = paired_summary(point + 1.0, point, d + 1.0, d, centre=True)
        assert p["delta"] == pytest.approx(1.0) and p["delta_ci95"] == pytest.approx([1.0, 1.0])


def test_fd_paired_identical_features_is_zero():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(50, 3, generator=g), torch.randn(40, 3, generator=g)
    idx = resample_indices(40, 50, seed=2)
    a = bootstrap_distribution(fd_statistic(real, fake), idx)
    b = bootstrap_distribution(fd_statistic(real, fake.clone()), idx)
    assert paired_summary(1.0, 1.0, a, b) == {"delta": 0.0, "delta_ci95": [0.0, 0.0]}


def test_determinism_given_the_seed():
    assert torch.equal(resample_indices(30, 20, seed=7), resample_indices(30, 20, seed=7))
    assert not torch.equal(resample_indices(30, 20, seed=7), resample_indices(30, 20, seed=8))
    x = _scores(30, 9)
    runs = [summary(0, bootstrap_distribution(mean_statistic(x), resample_indices(30, 100, seed=3)))["ci95"]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_bad_input():
    with pytest.raises(ValueError):
        resample_indices(0, 10, seed=0)
    with pytest.raises(ValueError):
        percentile_interval(torch.tensor([1.0]), level=1.5)
    with pytest.raises(ValueError):
        paired_summary(0, 0, torch.zeros(3), torch.zeros(4))
