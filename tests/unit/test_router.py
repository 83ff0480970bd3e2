"""The prompt router: Sinkhorn OT, Gumbel-sigmoid, codes, routing, losses, encoder cache, save/load."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from aptp.errors import ModelNotFoundError, SettingsError
from aptp.router import (
    ArchitectureCodes,
    ArchitecturePredictor,
    LocalCollective,
    PromptEncoder,
    TorchCollective,
    PromptRouter,
    assignment_loss,
    contrastive_loss,
    global_mean,
    gumbel_sigmoid,
    kmeanspp_indices,
    load_router,
    resource_loss,
    routed_mean,
    save_router,
    scale_gradient,
    sinkhorn,
)

# --------------------------------------------------------------------------- helpers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


class ThreadGroup:
    """Simulated process group: each member runs in its own thread; collectives meet at a barrier.

    Sums and gathers run in rank order, as a real all-reduce would give every process the same
    result."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=20)
        self.slots: list = [None] * world_size

    def member(self, rank: int) -> "ThreadMember":
        return ThreadMember(self, rank)

    def run(self, fn, parts: list) -> list:
        results: list = [None] * self.world_size
        errors: list = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(self.member(rank), parts[rank])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadMember(LocalCollective):
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        g = self.group
        g.slots[self.rank] = t.detach().clone()
        g.barrier.wait()
        out = [s.clone() for s in g.slots]
        g.barrier.wait()
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(t)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self._exchange(t)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen(seed)), dim=1)


def clustered_scores(per_cluster: int = 8, n_codes: int = 8, d: int = 32, noise: float = 0.05, seed: int = 0):
    """Cosine scores of samples in equal clusters around n_codes orthogonal code directions."""
    codes = torch.linalg.qr(torch.randn(d, n_codes, generator=gen(seed)))[0].T  # (N, d) orthonormal
    labels = torch.arange(n_codes).repeat_interleave(per_cluster)
    x = F.normalize(codes[labels] + noise * torch.randn(len(labels), d, generator=gen(seed + 1)), dim=1)
    return x @ codes.T, labels


# --------------------------------------------------------------------------- Sinkhorn


def test_sinkhorn_equipartition_with_enough_iterations():
    b, n = 64, 8
    scores = unit_rows(b, 16, 0) @ unit_rows(n, 16, 1).T
    q = sinkhorn(scores, epsilon=0.05, iterations=300)
    assert q.shape == (b, n) and q.dtype == scores.dtype
    assert torch.allclose(q.sum(dim=1), torch.ones(b), atol=1e-5)  # one unit of mass per sample
    assert torch.allclose(q.sum(dim=0), torch.full((n,), b / n), rtol=1e-3)  # B/N per code
    assert (q >= 0).all()


def test_sinkhorn_one_hot_on_clusters_at_paper_settings():
    scores, labels = clustered_scores()
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert (q.max(dim=1).values > 0.99).all()
    assert torch.equal(q.argmax(dim=1), labels)


def test_sinkhorn_balances_where_nearest_code_collapses():
    b, n = 64, 8
    g = gen(3)
    scores = 0.3 * torch.rand(b, n, generator=g)
    scores[:, 0] += 0.5  # every sample is nearest to code 0
    assert (scores.argmax(dim=1) == 0).all()
    counts = torch.bincount(sinkhorn(scores, 0.05, 3).argmax(dim=1), minlength=n)
    assert counts.max() <= 2 * b // n and (counts > 0).all(), counts


def test_sinkhorn_split_batch_equals_full_batch():
    scores = unit_rows(64, 16, 4) @ unit_rows(8, 16, 5).T
    full = sinkhorn(scores, epsilon=0.05, iterations=3)
    parts = [scores[:29], scores[29:]]  # uneven split
    halves = ThreadGroup(2).run(lambda comm, s: sinkhorn(s, 0.05, 3, all_reduce=comm.all_reduce), parts)
    split = torch.cat(halves)
    assert torch.allclose(split, full, atol=1e-6, rtol=0)
    assert torch.equal(split.argmax(dim=1), full.argmax(dim=1))


def test_sinkhorn_empty_local_batch_and_bad_input():
    scores = unit_rows(16, 8, 6) @ unit_rows(4, 8, 7).T
    full = sinkhorn(scores, 0.05, 3)
    parts = [scores, scores[:0]]  # one process with nothing: same collectives, no deadlock
    out = ThreadGroup(2).run(lambda comm, s: sinkhorn(s, 0.05, 3, all_reduce=comm.all_reduce), parts)
    assert out[1].shape == (0, 4) and torch.allclose(out[0], full, atol=1e-9)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(scores, 0.0)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        sinkhorn(scores[0])
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(scores, 0.05, 0)


def test_sinkhorn_is_shift_invariant_per_code_and_stable_for_large_scores():
    scores = (unit_rows(32, 8, 8) @ unit_rows(4, 8, 9).T).double()  # float64: the shift loses no bits
    shifted = scores + torch.tensor([100.0, -50.0, 3.0, 0.0], dtype=torch.float64)  # per-code offsets cancel
    assert torch.allclose(sinkhorn(scores, 0.05, 3), sinkhorn(shifted, 0.05, 3), atol=1e-6)
    q = sinkhorn(1000 * scores, 0.05, 3)
    assert torch.isfinite(q).all()


# --------------------------------------------------------------------------- Gumbel-sigmoid, codes, predictor


def test_gumbel_sigmoid_without_training_is_deterministic():
    logits = torch.tensor([[-2.0, -0.1, 0.0, 0.3, 4.0]])
    soft = gumbel_sigmoid(logits, 0.4, training=False)
    assert torch.equal(soft, torch.sigmoid(logits / 0.4))
    assert torch.equal(gumbel_sigmoid(logits, 0.4, training=False), soft)
    hard = gumbel_sigmoid(logits, 0.4, hard=True, training=False)
    assert torch.equal(hard, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]]))


def test_gumbel_sigmoid_noise_is_logistic_and_seeded():
    logits = torch.tensor([-1.0, 0.0, 2.0]).repeat(20000, 1)
    a = gumbel_sigmoid(logits, 0.4, generator=gen(0))
    assert torch.equal(a, gumbel_sigmoid(logits, 0.4, generator=gen(0)))
    assert not torch.equal(a, gumbel_sigmoid(logits, 0.4, generator=gen(1)))
    keep = gumbel_sigmoid(logits, 0.4, generator=gen(2), hard=True).mean(dim=0)
    # Bernoulli(sigmoid(logit)), as Eq. 9 promises (a single Gumbel would give 0.31 / 0.63 / 0.9994)
    assert torch.allclose(keep, torch.sigmoid(torch.tensor([-1.0, 0.0, 2.0])), atol=0.015)


def test_gumbel_sigmoid_hard_has_straight_through_gradient():
    logits = torch.zeros(4, 6, requires_grad=True)
    out = gumbel_sigmoid(logits, 0.4, generator=gen(0), hard=True)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    (out * torch.arange(6.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_codes_hard_vectors_and_init_from():
    codes = ArchitectureCodes(4, 12, generator=gen(0))
    assert torch.equal(codes.hard_vectors(), torch.ones(4, 12))  # bias 3: all kept at start
    e = torch.randn(40, 12, generator=gen(1))
    idx = codes.init_from(e, generator=gen(2))
    assert len(set(idx.tolist())) == 4
    assert torch.equal(codes.logits.detach(), e[idx])
    assert torch.equal(codes.hard_vectors(), (e[idx] >= 0).float())
    assert torch.equal(kmeanspp_indices(e, 4, gen(2)), idx)  # seeded: reproducible
    with pytest.raises(ValueError, match="distinct"):
        codes.init_from(torch.ones(40, 12), generator=gen(0))
    with pytest.raises(ValueError, match="at least 4"):
        codes.init_from(e[:3])


def test_codes_training_noise_only_in_training():
    codes = ArchitectureCodes(3, 5, generator=gen(0))
    codes.eval()
    assert torch.equal(codes(0.4), torch.sigmoid(codes.logits / 0.4))
    codes.train()
    assert not torch.equal(codes(0.4, generator=gen(1)), codes(0.4, generator=gen(2)))


def test_predictor_init_orthogonal_and_on_the_keep_side():
    pred = ArchitecturePredictor(16, 40, generator=gen(0))
    w = pred.linear.weight.detach()  # (40, 16)
    assert torch.allclose(w.T @ w, torch.eye(16), atol=1e-5)
    assert torch.all(pred.linear.bias == 3.0)
    e = pred(unit_rows(10, 16, 1))
    assert e.shape == (10, 40)
    assert gumbel_sigmoid(e, 0.4, training=False).min() > 0.99
    with pytest.raises(ValueError, match="expects 16"):
        pred(torch.zeros(2, 15))


# --------------------------------------------------------------------------- router


def trained_like_router(seed: int = 0, z_dim: int = 24, arch_dim: int = 60, n: int = 8, **kw) -> PromptRouter:
    """A router whose predictor spreads prompts over the space and whose codes are distinct."""
    router = PromptRouter(z_dim, arch_dim, n, generator=gen(seed), **kw)
    with torch.no_grad():
        router.predictor.linear.weight.normal_(0, 2.0, generator=gen(seed + 1))
        router.predictor.linear.bias.normal_(0.5, 1.0, generator=gen(seed + 2))
        router.init_codes(router.embed(unit_rows(256, z_dim, seed + 3)), generator=gen(seed + 4))
    return router


@pytest.mark.parametrize("similarity", ["logits", "gates", "centred"])
def test_route_does_not_depend_on_batch_or_position(similarity):
    router = trained_like_router(similarity=similarity).train()  # train mode must not add noise
    batch = unit_rows(64, 24, 10)
    prompt = batch[:1].clone()
    alone_i, alone_s = router.route(prompt)
    first_i, first_s = router.route(batch)
    last_i, last_s = router.route(torch.cat([batch[1:], prompt]))
    assert alone_i.item() == first_i[0].item() == last_i[-1].item()
    assert abs(alone_s.item() - first_s[0].item()) < 1e-6 and abs(alone_s.item() - last_s[-1].item()) < 1e-6
    again_i, again_s = router.route(batch)
    assert torch.equal(again_i, first_i) and torch.equal(again_s, first_s)
    assert len(first_i.unique()) > 1  # a real routing, not a constant


def test_route_is_cosine_argmax_of_eq22():
    router = trained_like_router()
    z = unit_rows(32, 24, 11)
    e = router.embed(z).double()
    a = router.codes.logits.double()
    cos = F.normalize(e, dim=1) @ F.normalize(a, dim=1).T
    idx, sim = router.route(z)
    assert torch.equal(idx, cos.argmax(dim=1))
    assert torch.allclose(sim, cos.max(dim=1).values, atol=1e-6)


def test_centred_similarity_ignores_the_shared_offset():
    """Raw-logit cosines of fresh codes sit at ~1 (the common keep-all +3); centred ones see only
    the differences between units, so a common shift of every logit changes no centred route."""
    router = PromptRouter(24, 60, 8, generator=gen(0), similarity="centred")
    raw = PromptRouter(24, 60, 8, generator=gen(0))
    e = raw.embed(unit_rows(32, 24, 3)).detach()
    assert raw.similarity(e).min() > 0.99  # the geometry the offset leaves to the logits
    assert router.similarity(e).abs().mean() < 0.5
    idx, sim = router.route(unit_rows(32, 24, 3))
    with torch.no_grad():
        router.codes.logits.add_(5.0)
        router.predictor.linear.bias.add_(-2.0)
    idx2, sim2 = router.route(unit_rows(32, 24, 3))
    assert torch.equal(idx, idx2) and torch.allclose(sim, sim2, atol=1e-5)  # float32 logits
    x = router.features(torch.randn(4, 60, generator=gen(1), dtype=torch.float64))
    assert torch.allclose(x.mean(dim=-1), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_router_similarity_comes_from_settings_and_survives_save(tmp_path):
    from aptp.settings_schema import RouterSettings

    class Enc:  # what the router reads of a PromptEncoder
        dim, name, id = 24, "toy-encoder", "toy-encoder-0123"

    settings = RouterSettings(similarity="centred", num_experts=4)
    router = PromptRouter.from_settings(settings, Enc(), 60, generator=gen(0))
    assert router.similarity_space == "centred" and router.num_codes == 4 and router.encoder_id == "toy-encoder-0123"
    save_router(router, tmp_path)
    assert load_router(tmp_path).similarity_space == "centred"
    with pytest.raises(ValueError):
        RouterSettings(similarity="dot")


def test_assign_train_ot_balances_and_nearest_does_not():
    router = trained_like_router()
    e = router.embed(unit_rows(64, 24, 12))
    with torch.no_grad():  # code 0 at the centroid, the others far off: the collapse of §3.2.2
        centroid = e.mean(dim=0)
        router.codes.logits.copy_(-centroid + 0.5 * torch.randn(8, 60, generator=gen(5)))
        router.codes.logits[0] = centroid
    nearest = router.assign_train(e, optimal_transport=False)
    ot = router.assign_train(e, optimal_transport=True, epsilon=0.05, iterations=3)
    assert torch.bincount(nearest, minlength=8).max() >= 48
    # 3 iterations balance approximately (more iterations: exactly B/N each)
    assert torch.bincount(ot, minlength=8).max() <= 24 and len(ot.unique()) == 8
    assert ot.dtype == torch.long and ot.shape == (64,)


def test_assignment_loss_known_value_and_bad_input():
    cos = torch.tensor([[0.5, 0.1, -0.2], [0.0, 0.3, 0.3]])
    target = torch.tensor([0, 2])
    expected = -torch.log_softmax(cos.double() / 0.1, dim=1)[[0, 1], [0, 2]]
    assert torch.allclose(assignment_loss(cos, target, 0.1).double(), expected)
    with pytest.raises(ValueError):
        assignment_loss(cos, target, 0.0)
    with pytest.raises(ValueError):
        assignment_loss(cos, torch.tensor([0]), 0.1)


def test_assignment_loss_makes_inference_routing_follow_ot():
    """Training on the OT targets moves nearest-code routing from a collapse to the OT balance."""
    router = trained_like_router()
    z = unit_rows(256, 24, 14)
    with torch.no_grad():  # every embedding is nearest to code 0: inference routing collapses
        e = router.embed(z)
        centroid = e.mean(dim=0)
        router.codes.logits.copy_(-centroid + 0.5 * torch.randn(8, 60, generator=gen(6)))
        router.codes.logits[0] = centroid
    before = torch.bincount(router.route(z)[0], minlength=8)
    assert before.max() >= 200
    opt = torch.optim.Adam(router.parameters(), lr=3e-2)
    for _ in range(150):
        e = router.embed(z)
        target = router.assign_train(e, optimal_transport=True, iterations=10)
        loss = assignment_loss(router.cosines(e), target, 0.1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = torch.bincount(router.route(z)[0], minlength=8)
    assert after.min() >= 0.5 * 256 / 8, after.tolist()


def test_assign_train_split_batch_equals_full():
    router = trained_like_router()
    e = router.embed(unit_rows(64, 24, 13)).detach()
    full = router.assign_train(e)
    parts = [e[:32], e[32:]]
    halves = ThreadGroup(2).run(lambda comm, x: router.assign_train(x, all_reduce=comm.all_reduce), parts)
    assert torch.equal(torch.cat(halves), full)


def test_save_load_router_routes_identically(tmp_path):
    router = trained_like_router(similarity="gates", n=5)
    router.encoder_name, router.encoder_id = "toy-encoder", "toy-encoder-0123"
    sub = save_router(router, tmp_path)
    assert sub == tmp_path / "router"
    assert {p.name for p in sub.iterdir()} == {"config.json", "predictor.safetensors"}
    assert (tmp_path / "codes.safetensors").is_file()
    cfg = json.loads((sub / "config.json").read_text())
    assert cfg["encoder"] == {"name": "toy-encoder", "id": "toy-encoder-0123"}
    assert (cfg["z_dim"], cfg["arch_dim"], cfg["num_codes"], cfg["temperature"]) == (24, 60, 5, 0.4)
    loaded = load_router(tmp_path)
    z = unit_rows(50, 24, 14)
    i0, s0 = router.route(z)
    i1, s1 = loaded.route(z)
    assert torch.equal(i0, i1) and torch.equal(s0, s1)
    assert torch.equal(loaded.hard_codes(), router.hard_codes())
    assert loaded.similarity_space == "gates" and loaded.encoder_id == "toy-encoder-0123"


def test_load_router_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no saved router"):
        load_router(tmp_path)
    router = trained_like_router()
    router.encoder_name, router.encoder_id = "a", "a-1"
    save_router(router, tmp_path)

    class OtherEncoder:
        name, id = "b", "b-2"

    with pytest.raises(SettingsError, match="same --prompt-encoder"):
        load_router(tmp_path, encoder=OtherEncoder())


def test_forward_returns_embeddings_and_code_gates():
    router = trained_like_router(n=3)
    z = unit_rows(5, 24, 15)
    router.train()
    e, gates = router(z, generator=gen(0))
    assert e.shape == (5, 60) and gates.shape == (3, 60)
    assert torch.equal(e, router.embed(z))
    router.eval()
    assert torch.equal(router(z)[1], torch.sigmoid(router.codes.logits / 0.4))
    (e.sum() + gates.sum()).backward()
    assert router.predictor.linear.weight.grad is not None and router.codes.logits.grad is not None


def test_torch_collective_in_a_one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        comm = TorchCollective()
        assert (comm.rank, comm.world_size) == (0, 1)
        x = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
        assert torch.equal(comm.all_reduce(x), x)
        assert [t.tolist() for t in comm.all_gather(x)] == [x.tolist()]
        scores = unit_rows(16, 8, 16) @ unit_rows(4, 8, 17).T
        assert torch.allclose(sinkhorn(scores, 0.05, 3, all_reduce=comm.all_reduce), sinkhorn(scores, 0.05, 3))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- losses


def test_contrastive_loss_prefers_matching_similarity_structure():
    g = gen(20)
    centers = torch.randn(4, 32, generator=g)
    labels = torch.arange(4).repeat_interleave(8)
    z = centers[labels] + 0.3 * torch.randn(32, 32, generator=g)
    patterns = torch.randn(4, 50, generator=g) * 4
    e_soft = torch.sigmoid(patterns[labels] + 0.5 * torch.randn(32, 50, generator=g))
    matched = contrastive_loss(z, e_soft, tau=0.03)
    shuffled = contrastive_loss(z, e_soft[torch.randperm(32, generator=g)], tau=0.03)
    assert matched < shuffled
    assert matched.ndim == 0 and torch.isfinite(matched)


def test_contrastive_loss_gradient_flows_to_predictor():
    pred = ArchitecturePredictor(16, 30, generator=gen(0))
    z = unit_rows(12, 16, 21)
    e_soft = gumbel_sigmoid(pred(z), 0.4, generator=gen(1))
    contrastive_loss(z, e_soft, tau=0.03).backward()
    grad = pred.linear.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_contrastive_loss_on_split_batch_equals_full_batch():
    z = torch.randn(20, 16, generator=gen(22))
    e = torch.rand(20, 30, generator=gen(23))
    e_full = e.clone().requires_grad_(True)
    full = contrastive_loss(z, e_full, tau=0.03)
    full.backward()

    def local(comm, idx):
        e_loc = e[idx].clone().requires_grad_(True)
        loss = contrastive_loss(z[idx], e_loc, tau=0.03, all_gather=comm.all_gather, rank=comm.rank)
        loss.backward()
        return loss.detach(), e_loc.grad

    parts = [slice(0, 9), slice(9, 20)]
    (l0, g0), (l1, g1) = ThreadGroup(2).run(local, parts)
    assert abs(l0.item() - full.item()) < 1e-6 and abs(l1.item() - full.item()) < 1e-6
    # each process holds the exact gradient of its own rows; together, the full gradient
    assert torch.allclose(torch.cat([g0, g1]), e_full.grad, atol=1e-7)


def test_resource_loss_zero_at_budget_and_symmetric_in_log_space():
    budget = 0.78
    at = torch.tensor(budget, requires_grad=True)
    loss = resource_loss(at, budget)
    loss.backward()
    assert loss.item() == 0.0 and at.grad.item() == 0.0
    hi = resource_loss(torch.tensor(budget * 1.25), budget)
    lo = resource_loss(torch.tensor(budget / 1.25), budget)
    assert abs(hi.item() - math.log(1.25)) < 1e-6 and abs(hi.item() - lo.item()) < 1e-6
    x = torch.tensor(0.9, requires_grad=True)
    resource_loss(x, budget).backward()
    assert x.grad.item() > 0  # above budget: pushes MACs down
    assert torch.isfinite(resource_loss(torch.tensor(0.0), budget))
    with pytest.raises(ValueError, match="budget"):
        resource_loss(x, 0.0)


def test_routed_mean_split_equals_full_and_gradients_sum():
    macs = torch.tensor([0.5, 0.7, 0.9, 1.0])
    assign = torch.tensor([0, 1, 1, 2, 3, 3, 3, 0, 2, 1])
    m_full = macs.clone().requires_grad_(True)
    full = routed_mean(m_full, assign)
    full.backward()
    assert abs(full.item() - macs[assign].mean().item()) < 1e-7

    def local(comm, a):
        m = macs.clone().requires_grad_(True)
        value = routed_mean(m, a, all_reduce=comm.all_reduce)
        value.backward()
        return value.detach(), m.grad

    (v0, g0), (v1, g1) = ThreadGroup(2).run(local, [assign[:3], assign[3:]])
    assert abs(v0.item() - full.item()) < 1e-7 and abs(v1.item() - full.item()) < 1e-7
    assert torch.allclose(g0 + g1, m_full.grad)  # DDP averages: hence scale_gradient(world_size)
    assert global_mean(torch.tensor([1.0, 3.0])).item() == 2.0


def test_scale_gradient_keeps_value():
    x = torch.tensor(2.0, requires_grad=True)
    y = scale_gradient(x * x, 3.0)
    y.backward()
    assert y.item() == 4.0 and x.grad.item() == 12.0


# --------------------------------------------------------------------------- encoder


def count_model_calls(enc: PromptEncoder) -> list[list[str]]:
    calls: list[list[str]] = []
    original = enc._compute

    def counting(prompts):
        calls.append(list(prompts))
        return original(prompts)

    enc._compute = counting
    return calls


@pytest.fixture(scope="module")
def minilm_model():
    """The shipped all-MiniLM-L6-v2, loaded once for the module (loading costs seconds)."""
    enc = PromptEncoder()
    return enc._load_model()


def test_encoder_cache_roundtrip(tmp_path, minilm_model):
    enc = PromptEncoder(cache_dir=tmp_path)
    enc._model = minilm_model
    calls = count_model_calls(enc)
    prompts = ["a red circle", "two blue squares", "a red circle", "the word hello"]
    emb = enc.encode(prompts)
    assert emb.shape == (4, 384) and emb.dtype == torch.float32
    assert calls == [["a red circle", "two blue squares", "the word hello"]]  # duplicates once
    assert torch.equal(emb[0], emb[2])
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)  # MiniLM ends in Normalize
    assert enc.dim == 384 and enc.id.startswith("all-MiniLM-L6-v2-")

    again = enc.encode(["the word hello", "a red circle"])
    assert len(calls) == 1  # all cached: the model does not run
    assert torch.equal(again, emb[[3, 0]])

    enc.encode(["a green star", "a red circle"])
    assert calls[-1] == ["a green star"]

    reloaded = PromptEncoder(cache_dir=tmp_path)
    calls2 = count_model_calls(reloaded)
    out = reloaded.encode(prompts + ["a green star"])
    assert calls2 == [] and reloaded._model is None  # read from disk, model never loaded
    assert torch.equal(out[:4], emb)
    assert reloaded.dim == 384 and reloaded.id == enc.id
    assert (tmp_path / enc.id / "encoder.json").is_file()
    assert enc.encode([]).shape == (0, 384)


def test_encoder_ids_do_not_mix(tmp_path, minilm_model):
    shipped = PromptEncoder(cache_dir=tmp_path / "cache")
    shipped._model = minilm_model
    # the same weights without the Normalize module: another encoder with another id
    variant_dir = tmp_path / "minilm-unnormalised"
    variant_dir.mkdir()
    for item in shipped.path.iterdir():
        if item.name != "modules.json":
            (variant_dir / item.name).symlink_to(item)
    modules = json.loads((shipped.path / "modules.json").read_text())
    (variant_dir / "modules.json").write_text(json.dumps([m for m in modules if "Normalize" not in m["type"]]))
    variant = PromptEncoder(str(variant_dir), cache_dir=tmp_path / "cache")
    assert variant.id != shipped.id and variant.id.startswith("minilm-unnormalised-")

    a = shipped.encode(["a yellow triangle"])
    calls = count_model_calls(variant)
    b = variant.encode(["a yellow triangle"])
    assert len(calls) == 1  # not served from the other encoder's rows
    assert abs(a.norm().item() - 1) < 1e-5 and abs(b.norm().item() - 1) > 1e-2
    assert torch.allclose(F.normalize(b, dim=1), a, atol=1e-5)
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {shipped.id, variant.id}
    assert torch.equal(PromptEncoder(str(variant_dir), cache_dir=tmp_path / "cache").encode(["a yellow triangle"]), b)


def test_encoder_shards_compact(tmp_path, minilm_model):
    enc = PromptEncoder(cache_dir=tmp_path)
    enc._model = minilm_model
    enc.max_shards = 2
    words = ["one", "two", "three", "four", "five"]
    first = [enc.encode([w]) for w in words]
    assert len(list((tmp_path / enc.id).glob("emb-*.safetensors"))) <= 3
    reloaded = PromptEncoder(cache_dir=tmp_path)
    calls = count_model_calls(reloaded)
    assert torch.equal(reloaded.encode(words), torch.cat(first)) and calls == []


def test_encoder_unknown_name_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as info:
        PromptEncoder("no-such-org/no-such-encoder-xyz")
    assert "\n" not in str(info.value) and "no-such-encoder-xyz" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="not found"):
        PromptEncoder(str(tmp_path / "missing" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a sentence-transformers folder"):
        PromptEncoder(str(tmp_path / "empty"))


def test_router_with_encoder_end_to_end(tmp_path, minilm_model):
    enc = PromptEncoder(cache_dir=tmp_path / "cache")
    enc._model = minilm_model
    router = PromptRouter(enc.dim, 40, 4, encoder=enc, generator=gen(0))
    prompts = ["a red circle", "a blue square", "two cats", "the word sun", "a green star", "a dog"]
    with torch.no_grad():
        router.predictor.linear.weight.normal_(0, 2.0, generator=gen(1))
        router.init_codes(router.embed(enc.encode(prompts)), generator=gen(2))
    idx, _ = router.route_prompts(prompts)
    save_router(router, tmp_path / "run")
    loaded = load_router(tmp_path / "run", encoder=PromptEncoder(cache_dir=tmp_path / "cache"))
    assert torch.equal(loaded.route_prompts(prompts)[0], idx)
    assert loaded.encoder_id == enc.id
