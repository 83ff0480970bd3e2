"""Metrics: Fréchet distance, CMMD, CLIP score, PickScore, the statistics cache and the loaders."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from aptp.errors import DataError, ModelNotFoundError
from aptp.metrics import (
    ClipFeatures,
    FeatureNet,
    GaussianStats,
    PickScore,
    StatsCache,
    clip_score,
    clip_scores_from_features,
    cmmd,
    compute_metrics,
    fid_torchmetrics,
    frechet_distance,
    mmd2,
    real_statistics,
    resize_for_eval,
)
from aptp.metrics.features import (
    InceptionFeatures,
    images_to_uint8,
    load_fid_features,
    resolve_open_clip_weights,
    uint8_to_images,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def random_images(n: int, size: int = 16, seed: int = 0, offset: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256 - offset, size=(n, size, size, 3), dtype=np.int64) + offset
    return [Image.fromarray(a.astype(np.uint8), mode="RGB") for a in arr]


class PooledPixels:
    """A tiny deterministic feature network: 2x2 average-pooled RGB (12 features)."""

    num_features = 12
    feature_id = "pooled-pixels-2x2"

    def image_features(self, images, batch_size: int = 64) -> torch.Tensor:
        x = images_to_uint8(images).double() / 255  # (N, 3, H, W)
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # (N, 12)


class _StubClip(nn.Module):
    """encode_image: the image's mean colour; encode_text: a fixed vector per caption."""

    def __init__(self, text_vectors: dict[str, list[float]]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the stub a device and a fingerprint
        self.words = list(text_vectors)
        self.register_buffer("table", torch.tensor([text_vectors[w] for w in self.words]))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 1, 1) -> (B, 3)
        return x.flatten(1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 3)
        return self.table[tokens]


def stub_features(text_vectors: dict[str, list[float]]) -> ClipFeatures:
    model = _StubClip(text_vectors)

    def preprocess(im: Image.Image) -> torch.Tensor:  # mean colour, centred: (3, 1, 1)
        return torch.from_numpy(np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) / 255 - 0.5)[:, None, None]

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([model.words.index(t) for t in texts])

    return ClipFeatures(model, preprocess, tokenizer, label="stub")


def solid(rgb: tuple[int, int, int], size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


@pytest.fixture(scope="module")
def domain_clip_dir(tmp_path_factory):
    from aptp.models.toy import build_domain_clip, save_domain_clip

    return save_domain_clip(build_domain_clip(seed=0), tmp_path_factory.mktemp("domain-clip"))


@pytest.fixture(scope="module")
def domain_clip(domain_clip_dir):
    return ClipFeatures.domain_clip(domain_clip_dir)


# ----------------------------------------------------------------------------- Fréchet distance


def test_fd_of_identical_sets_is_zero():
    x = torch.randn(200, 6, generator=_gen(0), dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-10)


def test_fd_of_shifted_set_is_squared_shift():
    x = torch.randn(300, 5, generator=_gen(1), dtype=torch.float64) @ torch.randn(5, 5, generator=_gen(2),
                                                                                   dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    # Same covariance, so the trace term vanishes: FD = ||shift||^2 = 1 + 4 + 0.25 + 9 = 14.25.
    assert frechet_distance(x, x + shift) == pytest.approx(14.25, rel=1e-9)
    # Scaling by a multiplies the covariance by a^2: trace term = (1 - a)^2 Tr(S).
    a = 3.0
    tr = GaussianStats.from_features(x).cov.trace().item()
    assert frechet_distance(x, a * x + shift) == pytest.approx(
        ((1 - a) * x.mean(0) - shift).square().sum().item() + (1 - a) ** 2 * tr, rel=1e-9)


def test_fd_of_diagonal_gaussians_closed_form():
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    mu = torch.tensor([1.0, 1.0, 0.0])
    a = GaussianStats(torch.zeros(3, dtype=torch.float64), torch.diag(d1).double(), 10)
    b = GaussianStats(mu.double(), torch.diag(d2).double(), 10)
    # ||mu||^2 + sum (sqrt d1 - sqrt d2)^2 = 2 + (1 + 1 + 6.25)
    assert frechet_distance(a, b) == pytest.approx(10.25, rel=1e-12)


def test_fd_matches_torchmetrics_formula_on_general_covariances():
    from torchmetrics.image.fid import _compute_fid

    g = _gen(3)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(80, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64) + 0.3
    a, b = GaussianStats.from_features(x), GaussianStats.from_features(y)
    expected = _compute_fid(a.mean, a.cov, b.mean, b.cov).item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [6, 40])  # fewer and more generated vectors than dimensions (the Gram side)
def test_fd_reference_factored_once_equals_fd(n):
    from aptp.metrics.fid import FrechetReference

    g = torch.Generator().manual_seed(3)
    real = torch.randn(50, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    ref = FrechetReference(GaussianStats.from_features(real))
    for shift in (0.0, 0.7):
        fake = torch.randn(n, 12, generator=g, dtype=torch.float64) * 1.3 + shift
        # rel 1e-7: with N < d the d x d route takes square roots of round-off-sized eigenvalues
        assert ref.distance(fake) == pytest.approx(frechet_distance(real, fake), rel=1e-7, abs=1e-9)
    assert ref.distance(real) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError):
        ref.distance(torch.zeros(1, 12))


def test_our_fd_equals_torchmetrics_fid_with_featurenet():
    real, fake = random_images(40, seed=0), random_images(48, seed=1, offset=40)
    net = PooledPixels()
    ours = frechet_distance(net.image_features(real), net.image_features(fake))
    theirs = fid_torchmetrics(real, fake, net, batch_size=16)
    assert ours > 0.01
    assert ours == pytest.approx(theirs, rel=1e-7)


def test_featurenet_is_the_extractor_on_uint8_tensors(domain_clip):
    imgs = random_images(5, size=32, seed=4)
    net = FeatureNet(domain_clip, batch_size=2)
    assert net.num_features == 128
    x = images_to_uint8(imgs)  # (5, 3, 32, 32) uint8
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 32, 32)
    out = net(x)
    assert out.shape == (5, 128) and out.dtype == torch.float64
    torch.testing.assert_close(out, domain_clip.image_features(imgs, batch_size=2), rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    net.train()
    assert not net.training and not domain_clip.model.training
    assert [np.asarray(i).tolist() for i in uint8_to_images(x)] == [np.asarray(i).tolist() for i in imgs]


# ----------------------------------------------------------------------------- CMMD


def _kernel(a: torch.Tensor, b: torch.Tensor, sigma: float = 10.0) -> torch.Tensor:
    return torch.exp(-torch.cdist(a, b).square() / (2 * sigma ** 2))


def test_cmmd_hand_computed_two_by_two():
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [0.0, 20.0]])
    # Squared distances: within X 100, within Y 400, across 0, 400, 100, 500; k = exp(-d2 / 200).
    # Biased: [(2 + 2e^-.5) + (2 + 2e^-2) - 2 (1 + e^-2 + e^-.5 + e^-2.5)] / 4 = (1 - e^-2.5) / 2.
    assert cmmd(x, y, estimator="biased") == pytest.approx(1000 * (1 - math.exp(-2.5)) / 2, rel=1e-12)
    assert cmmd(x, y, estimator="biased") == pytest.approx(458.9575, abs=1e-4)
    # Unbiased: e^-.5 + e^-2 - (1 + e^-2 + e^-.5 + e^-2.5) / 2.
    unbiased = 1000 * (math.exp(-0.5) + math.exp(-2) - (1 + math.exp(-2) + math.exp(-0.5) + math.exp(-2.5)) / 2)
    assert cmmd(x, y, estimator="unbiased") == pytest.approx(unbiased, rel=1e-12)
    assert cmmd(x, y, estimator="unbiased") == pytest.approx(-170.1095, abs=1e-4)


def test_cmmd_of_identical_sets():
    x = torch.nn.functional.normalize(torch.randn(50, 16, generator=_gen(5), dtype=torch.float64), dim=-1)
    assert cmmd(x, x, estimator="biased") == 0.0  # biased: the three kernel means coincide exactly
    # Unbiased with X = Y: 2 (S - n) / (n (n-1)) - 2 S / n^2 = 2 (S - n^2) / (n^2 (n-1)), S = sum of K.
    n, s = 50, _kernel(x, x).sum().item()
    assert cmmd(x, x, estimator="unbiased") == pytest.approx(1000 * 2 * (s - n * n) / (n * n * (n - 1)), rel=1e-9)
    assert cmmd(x, x, estimator="unbiased") < 0


def test_cmmd_matches_explicit_kernel_means_and_grows_with_shift():
    g = _gen(6)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
    expected = _kernel(x, x).mean() + _kernel(y, y).mean() - 2 * _kernel(x, y).mean()
    assert mmd2(x, y, estimator="biased") == pytest.approx(expected.item(), rel=1e-10)
    values = [cmmd(x, y + s, estimator="biased") for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values


def test_cmmd_blocks_give_the_same_sum(monkeypatch):
    # importlib: the attribute aptp.metrics.cmmd is the re-exported function, not the module
    cmmd_mod = importlib.import_module("aptp.metrics.cmmd")
    g = _gen(7)
    x, y = torch.randn(23, 3, generator=g), torch.randn(17, 3, generator=g)
    full = [cmmd(x, y), cmmd(x, y, estimator="unbiased")]
    monkeypatch.setattr(cmmd_mod, "_BLOCK", 5)
    assert [cmmd(x, y), cmmd(x, y, estimator="unbiased")] == pytest.approx(full, rel=1e-12)


def test_cmmd_rejects_bad_input():
    with pytest.raises(ValueError, match="estimator"):
        mmd2(torch.zeros(2, 2), torch.zeros(2, 2), estimator="other")
    with pytest.raises(ValueError, match="at least 2"):
        mmd2(torch.zeros(1, 2), torch.zeros(3, 2), estimator="unbiased")
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        mmd2(torch.zeros(2, 2), torch.zeros(4, 3))


# ----------------------------------------------------------------------------- CLIP score


def test_clip_score_is_100_cos_floored_at_zero():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    txt = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [3.0, 0.0], [0.0, -1.0]])
    scores = clip_scores_from_features(img, txt)
    torch.testing.assert_close(scores, torch.tensor([100 / math.sqrt(2), 0.0, 100.0, 0.0], dtype=torch.float64))


def test_clip_score_with_constructed_embeddings():
    feats = stub_features({"red": [1.0, 0.0, 0.0], "blue": [0.0, 0.0, 1.0], "purple": [1.0, 0.0, 1.0]})
    # Mean colours, centred: red image -> (0.5, -0.5, -0.5); blue image -> (-0.5, -0.5, 0.5).
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    cos_red_red = 0.5 / math.sqrt(0.75)
    cos_blue_purple = 0.0  # (-0.5 + 0.5) / ... = 0
    assert clip_score([red], ["red"], feats) == pytest.approx(100 * cos_red_red, rel=1e-6)
    assert clip_score([blue], ["red"], feats) == 0.0  # cos = -0.5 / sqrt(.75) < 0 -> floored
    assert clip_score([blue], ["purple"], feats) == pytest.approx(cos_blue_purple, abs=1e-9)
    assert clip_score([red, blue], ["red", "red"], feats) == pytest.approx(50 * cos_red_red, rel=1e-6)
    with pytest.raises(ValueError, match="2 images and 1 captions"):
        clip_score([red, blue], ["red"], feats)


def test_clip_features_are_unit_float64(domain_clip):
    t = domain_clip.text_features(["a red circle", "a blue square"])
    i = domain_clip.image_features(random_images(3, size=64, seed=8), batch_size=2)
    assert t.shape == (2, 128) and i.shape == (3, 128)
    assert t.dtype == i.dtype == torch.float64
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    assert domain_clip.feature_id.startswith("domain-clip-")


# ----------------------------------------------------------------------------- cache


def test_stats_cache_round_trip_and_key(tmp_path):
    cache = StatsCache(tmp_path)
    x = torch.randn(10, 4, generator=_gen(9), dtype=torch.float64)
    stats = GaussianStats.from_features(x, keep_features=True)
    path = cache.save("coco-val n=10@256px", "net-a", stats)
    assert path.parent == tmp_path and path.suffix == ".safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left
    back = cache.load("coco-val n=10@256px", "net-a")
    torch.testing.assert_close(back.mean, stats.mean, rtol=0, atol=0)
    torch.testing.assert_close(back.cov, stats.cov, rtol=0, atol=0)
    torch.testing.assert_close(back.features, x, rtol=0, atol=0)
    assert back.count == 10
    assert cache.load("coco-val n=10@256px", "net-b") is None  # keyed by feature network
    assert cache.load("coco-val n=11@256px", "net-a") is None  # and by data set
    assert cache.path("d", "net-a") != cache.path("d", "net-b")
    path.write_bytes(b"garbage")
    assert cache.load("coco-val n=10@256px", "net-a") is None  # unreadable -> recompute


def test_real_statistics_uses_cache_per_feature_network(tmp_path):
    cache, calls = StatsCache(tmp_path), []

    def load():
        calls.append(1)
        return random_images(12, seed=10)

    net = PooledPixels()
    first = real_statistics("ds", net, load, cache)
    second = real_statistics("ds", net, None, cache)  # cache hit: images not needed
    assert len(calls) == 1
    torch.testing.assert_close(first.cov, second.cov, rtol=0, atol=0)

    other = PooledPixels()
    other.feature_id = "pooled-pixels-other"
    real_statistics("ds", other, load, cache)  # another network -> another entry
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2
    with pytest.raises(DataError, match="no cached real statistics"):
        real_statistics("ds-unknown", net, None, cache)
    # Entries without features are recomputed when features are needed (CMMD).
    with_feats = real_statistics("ds", net, load, cache, keep_features=True)
    assert len(calls) == 3 and with_feats.features.shape == (12, 12)


def test_feature_id_follows_the_weights(domain_clip_dir):
    from aptp.models.toy import build_domain_clip, save_domain_clip

    a = ClipFeatures.domain_clip(domain_clip_dir)
    b = ClipFeatures.domain_clip(domain_clip_dir)
    assert a.feature_id == b.feature_id  # same weights, same id
    other = save_domain_clip(build_domain_clip(seed=1), domain_clip_dir.parent / "other")
    assert ClipFeatures.domain_clip(other).feature_id != a.feature_id


# ----------------------------------------------------------------------------- compute_metrics


def test_resize_for_eval():
    sq = resize_for_eval(solid((1, 2, 3), size=64))
    assert sq.size == (256, 256) and sq.mode == "RGB"
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 100, 100))  # white left third is cropped away
    out = resize_for_eval(wide, 32)
    assert out.size == (32, 32) and np.asarray(out).max() < 40


def test_compute_metrics_end_to_end(domain_clip, tmp_path):
    fake, real = random_images(6, size=64, seed=11), random_images(8, size=64, seed=12)
    captions = ["a red circle"] * 6
    kw = dict(features=domain_clip, real_stats_key="toy-real", cache=tmp_path, resolution=128)
    out = compute_metrics(fake, captions, real, ["fid", "clip", "cmmd"], **kw)
    assert set(out) == {"n_images", "resolution", "fid", "fid_features", "clip", "cmmd", "clip_features"}
    assert out["n_images"] == 6 and out["fid"] > 0 and 0 <= out["clip"] <= 100
    assert out["fid_features"] == domain_clip.feature_id
    assert len(list(tmp_path.iterdir())) == 1  # one entry: FD and CMMD share the CLIP embeddings
    again = compute_metrics(fake, captions, None, ["fid", "clip", "cmmd"], **kw)  # reals from cache
    assert again == out
    # Same numbers from the building blocks, on the resized images.
    rf = domain_clip.image_features([resize_for_eval(i, 128) for i in real])
    ff = domain_clip.image_features([resize_for_eval(i, 128) for i in fake])
    assert out["fid"] == pytest.approx(frechet_distance(rf, ff), rel=1e-9)
    assert out["cmmd"] == pytest.approx(cmmd(rf, ff), rel=1e-9)  # the default (unbiased) estimator
    kept = {}  # what was computed per image comes back for the bootstrap (nothing embedded twice)
    assert compute_metrics(fake, captions, None, ["fid", "clip", "cmmd"], keep=kept, **kw) == out
    assert set(kept) == {"clip_image", "clip", "fid_image"}
    assert torch.allclose(kept["clip_image"], ff) and kept["fid_image"] is kept["clip_image"]
    assert kept["clip"].shape == (6,) and float(kept["clip"].mean()) == pytest.approx(out["clip"], rel=1e-12)
    # A separate FID network gets its own cache entry.
    out2 = compute_metrics(fake, captions, real, ["fid"], domain_clip, fid_features=PooledPixels(),
                           real_stats_key="toy-real", cache=tmp_path)
    assert out2["fid_features"] == "pooled-pixels-2x2" and len(list(tmp_path.iterdir())) == 2
    # A loader of the real images is called only on a cache miss, and once however many networks.
    calls = []

    def loader():
        calls.append(1)
        return real

    assert compute_metrics(fake, captions, loader, ["fid", "clip", "cmmd"], **kw) == out and not calls
    fresh = dict(kw, cache=tmp_path / "fresh")
    got = compute_metrics(fake, captions, loader, ["fid", "cmmd"], fid_features=PooledPixels(), **fresh)
    assert got["cmmd"] == pytest.approx(out["cmmd"], rel=1e-9) and len(calls) == 1
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(fake, captions, real, ["fid", "is"], domain_clip)
    with pytest.raises(ValueError, match="pickscore"):
        compute_metrics(fake, captions, real, ["pickscore"], domain_clip)


# ----------------------------------------------------------------------------- PickScore


def test_pickscore_with_tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from aptp.models.toy import build_tokenizer

    tok = build_tokenizer(24)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=24, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(cfg)
    folder = tmp_path / "pickscore"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)

    ps = PickScore.from_pretrained(folder)
    imgs, prompts = random_images(3, size=40, seed=13), ["a red circle", "a blue square", "the word sun"]
    scores = ps.scores(imgs, prompts, batch_size=2)
    # Reference usage: exp(logit_scale) * cos(image, text).
    with torch.no_grad():
        pix = ps.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        t = tok(prompts, padding=True, return_tensors="pt")
        i_emb = model.get_image_features(pixel_values=pix)
        t_emb = model.get_text_features(**t)
        i_emb = getattr(i_emb, "pooler_output", i_emb)
        t_emb = getattr(t_emb, "pooler_output", t_emb)
        cos = torch.nn.functional.cosine_similarity(i_emb.double(), t_emb.double(), dim=-1)
    torch.testing.assert_close(scores, model.logit_scale.exp().double() * cos, rtol=1e-5, atol=1e-5)
    assert ps(imgs, prompts) == pytest.approx(scores.mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- missing weights


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def test_missing_open_clip_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_open_clip_weights("ViT-B-32", None, cache_dir=tmp_path)
    msg = _one_line(exc)
    assert "open_clip_pytorch_model.bin" in msg and "--set eval.clip_pretrained=" in msg
    with pytest.raises(ModelNotFoundError) as exc:
        ClipFeatures.from_open_clip("ViT-B-32", str(tmp_path / "nope.bin"), cache_dir=tmp_path)
    assert "nope.bin" in _one_line(exc)
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_open_clip_weights("ViT-B-32", "no-such-tag", cache_dir=tmp_path)
    assert "laion2b_s34b_b79k" in _one_line(exc)


def test_open_clip_weights_found_in_local_caches(tmp_path):
    # URL-style weights (open_clip's ~/.cache/clip layout) and a plain file path.
    (tmp_path / "ViT-B-32.pt").write_bytes(b"x")
    assert resolve_open_clip_weights("ViT-B-32", "openai", cache_dir=tmp_path) == tmp_path / "ViT-B-32.pt"
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    assert resolve_open_clip_weights("ViT-B-32", str(f)) == f


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_open_clip_builtin_architecture_from_a_weight_file(tmp_path):
    import json

    import open_clip

    from aptp.metrics.features import _is_torchscript

    # A tiny architecture registered like a built-in one, with open_clip's own BPE tokenizer.
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    (tmp_path / "aptp-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "aptp-test-tiny.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("aptp-test-tiny")
    torch.save(model.state_dict(), tmp_path / "tiny.bin")
    feats = ClipFeatures.from_open_clip("aptp-test-tiny", str(tmp_path / "tiny.bin"))
    torch.testing.assert_close(feats.model.logit_scale, model.logit_scale)
    assert feats.text_features(["a photo of a cat"]).shape == (1, 16)
    assert feats.image_features(random_images(2, size=48, seed=14)).shape == (2, 16)
    assert not _is_torchscript(tmp_path / "tiny.bin")
    torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "jit.pt"))
    assert _is_torchscript(tmp_path / "jit.pt")


def _fake_hf_cache(cache, repo: str, files: dict[str, bytes]):
    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/<files>}.
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0123abcd")
    snap = root / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_open_clip_weights_found_in_hf_cache(tmp_path, domain_clip_dir):
    snap = _fake_hf_cache(tmp_path, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", {"open_clip_model.safetensors": b"x"})
    got = resolve_open_clip_weights("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path)
    assert got == snap / "open_clip_model.safetensors"
    # hf-hub: names load the cached snapshot folder as a local dir.
    files = {f.name: f.read_bytes() for f in domain_clip_dir.iterdir() if f.is_file()}
    _fake_hf_cache(tmp_path, "aptp/domain-clip", files)
    feats = ClipFeatures.from_open_clip("hf-hub:aptp/domain-clip", cache_dir=tmp_path)
    assert feats.label == "open_clip-aptp-domain-clip"
    assert feats.text_features(["a red circle"]).shape == (1, 128)
    with pytest.raises(ModelNotFoundError) as exc:
        ClipFeatures.from_open_clip("hf-hub:aptp/not-cached", cache_dir=tmp_path)
    _one_line(exc)


def test_open_clip_local_dir(domain_clip_dir):
    feats = ClipFeatures.from_open_clip(f"local-dir:{domain_clip_dir}")
    assert feats.text_features(["a red circle"]).shape == (1, 128)


def test_missing_pickscore_and_domain_clip_and_inception_are_one_line(tmp_path):
    with pytest.raises(ModelNotFoundError) as exc:
        PickScore.from_pretrained(tmp_path / "no-pickscore")
    assert "yuvalkirstain/PickScore_v1" in _one_line(exc)
    with pytest.raises(ModelNotFoundError) as exc:
        PickScore.from_pretrained("someone/not-cached-model")
    _one_line(exc)
    with pytest.raises(ModelNotFoundError) as exc:
        load_fid_features(f"domain-clip:{tmp_path / 'nothing'}")
    _one_line(exc)
    with pytest.raises(ModelNotFoundError) as exc:
        InceptionFeatures(tmp_path / "missing-inception.pth")
    assert "eval.fid_features" in _one_line(exc)
