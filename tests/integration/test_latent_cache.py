"""data.cache_latents: the cached posteriors are what the VAE returns, the cache is built once per
data set and VAE, a damaged one is one clear line, and random transforms are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aptp.data import build_dataset
from aptp.errors import AptpUserError
from aptp.rundir import DamagedFileError
from aptp.settings import resolve_settings
from aptp.train import latents as L
from aptp.train.teacher import load_teacher

pytestmark = pytest.mark.integration


def _settings(pipe, cache, *extra):
    return resolve_settings(cli={"model.name": str(pipe)},
                            overrides=["data.resolution=16", "data.max_samples=20", "data.cache_latents=true",
                                       f"data.latent_cache_dir={cache}", *extra])


@pytest.fixture(scope="module")
def teacher(tiny_pipeline_dir):
    return load_teacher(resolve_settings(cli={"model.name": str(tiny_pipeline_dir)}).model)


def test_cached_posteriors_are_the_vae_s(tiny_pipeline_dir, teacher, tmp_path, monkeypatch):
    s = _settings(tiny_pipeline_dir, tmp_path)
    ds = build_dataset(s.data, seed=0)
    cache = L.open_latent_cache(s, teacher, ds, batch_size=8)  # 20 images: batches of 8, 8, 4
    idx = torch.tensor([19, 3, 3, 0, 11])  # any order, repeats
    mean, std = cache.lookup(idx)
    px = torch.stack([ds[int(i)]["pixel_values"] for i in idx])
    ref_mean, ref_std = teacher.encode_images(px)
    torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, ref_std, atol=1e-5, rtol=1e-5)
    assert cache.count == 20 and mean.shape[1:] == ref_mean.shape[1:]

    # opened again: read back, not rebuilt
    monkeypatch.setattr(L, "build_latent_cache", lambda *a, **k: pytest.fail("rebuilt an existing cache"))
    again = L.open_latent_cache(s, teacher, ds)
    assert again.path == cache.path
    # another resolution or sample count is another cache
    for extra in ("data.resolution=24", "data.max_samples=12"):
        other = _settings(tiny_pipeline_dir, tmp_path, extra)
        assert L.cache_key(other.data, build_dataset(other.data, seed=0), teacher.vae) != cache.path.name
    # other VAE weights: another key
    vae = teacher.vae
    w = next(iter(vae.parameters()))
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(1e-3)
        try:
            assert L.cache_key(s.data, ds, vae) != cache.path.name
        finally:
            w.copy_(saved)
    assert L.cache_key(s.data, ds, vae) == cache.path.name
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary folder left behind


def test_a_damaged_cache_is_one_line(tiny_pipeline_dir, teacher, tmp_path):
    s = _settings(tiny_pipeline_dir, tmp_path)
    ds = build_dataset(s.data, seed=0)
    cache = L.open_latent_cache(s, teacher, ds, batch_size=8)
    present = np.load(cache.path / "present.npy")
    present[7] = False
    np.save(cache.path / "present.npy", present)
    with pytest.raises(DamagedFileError, match="no latent for data-set index 7"):
        L.open_latent_cache(s, teacher, ds).lookup([1, 7])
    (cache.path / "mean.npy").write_bytes(b"not an array")
    with pytest.raises(DamagedFileError) as err:
        L.open_latent_cache(s, teacher, ds)
    assert "\n" not in str(err.value) and str(cache.path) in str(err.value)


@pytest.mark.parametrize("extra", ["data.random_flip=true", "data.center_crop=false"])
def test_random_transforms_are_refused(extra, tmp_path):
    with pytest.raises(AptpUserError, match="cannot be cached"):
        resolve_settings(overrides=["data.cache_latents=true", extra])


def test_cached_items_read_captions_and_fall_back_for_missing_latents(tiny_pipeline_dir, teacher, tmp_path,
                                                                      monkeypatch):
    s = _settings(tiny_pipeline_dir, tmp_path)
    ds = build_dataset(s.data, seed=0)
    cache = L.open_latent_cache(s, teacher, ds, batch_size=8)
    cache.present[5] = False  # as if image 5 had been unreadable when the cache was built
    drawn = []
    original = type(ds).__getitem__
    monkeypatch.setattr(type(ds), "__getitem__", lambda self, i: drawn.append(int(i)) or original(self, i))
    items = L.CachedItems(ds, cache)
    assert drawn == [0] and items.image_size == (16, 16)  # the size probe: the first cached image
    drawn.clear()
    assert [items[i]["caption"] for i in range(len(items))] == ds.captions()
    assert drawn == [5]  # only the missing latent goes back to the data set
    assert items[5]["index"] == 5 and items[3] == {"caption": ds.captions()[3], "index": 3, "skipped": 0}
    # a cache of another length than the data set: one line naming the cache
    short = build_dataset(_settings(tiny_pipeline_dir, tmp_path, "data.max_samples=12").data, seed=0)
    with pytest.raises(DamagedFileError, match="it holds 20 items, the data set 12") as err:
        L.CachedItems(short, cache)
    assert "\n" not in str(err.value) and str(cache.path) in str(err.value)
