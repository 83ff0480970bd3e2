"""`aptp prune` end to end on a tiny pipeline: outputs, ablations, resume after SIGKILL,
2 processes ≡ 1 process, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from aptp.cli.main import app
from aptp.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.integration

LOSSES = ("loss_ddpm", "loss_distill_output", "loss_distill_block", "loss_resource", "loss_contrastive")


@pytest.fixture(scope="module")
def emb_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emb")


def common(pipe: Path, cache: Path, steps: int = 4, warmup: int = 2, batch: int = 8) -> list[str]:
    return ["--model", str(pipe), "--resolution", "16", "--batch-size", str(batch), "--warmup-steps", str(warmup),
            "--steps", str(steps), "--set", "data.max_samples=48", "--set", "prune.log_every=1",
            "--set", "prune.checkpoint_every=2", "--set", f"router.embedding_cache={cache}",
            "--set", "prune.lr_warmup_steps=1", "--set", "prune.lr=0.05"]


def cli(*args: str):
    return CliRunner().invoke(app, ["prune", *args], env={"HF_HUB_OFFLINE": "1"})


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_prune_writes_the_run_directory(tiny_pipeline_dir, emb_cache, tmp_path):
    run = tmp_path / "run"
    res = cli(*common(tiny_pipeline_dir, emb_cache), "--output", str(run))
    assert res.exit_code == 0, res.output
    for name in ("settings.yaml", "run-meta.json", "arch_space.json", "metrics.jsonl", "codes.safetensors",
                 "routing.json", "router/config.json", "router/predictor.safetensors"):
        assert (run / name).is_file(), name
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["phase"] for r in rows] == ["warmup"] * 2 + ["codes"] * 4
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in LOSSES)
    assert "share_per_expert" in rows[-1] and abs(sum(rows[-1]["share_per_expert"]) - 1) < 1e-9
    routing = json.loads((run / "routing.json").read_text())
    assert routing["num_codes"] == 8 and len(routing["share_per_expert"]) == 8
    assert load_file(str(run / "codes.safetensors"))["logits"].shape[0] == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    # never overwritten without --overwrite
    before = (run / "metrics.jsonl").read_bytes()
    again = cli(*common(tiny_pipeline_dir, emb_cache), "--output", str(run))
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("flags", [["--no-optimal-transport"], ["--no-distill"], ["--method", "uni-arch"],
                                   ["--method", "uni-arch-paper"], ["--method", "weight-norm"], ["--method", "taylor"],
                                   ["--method", "bk-sdm"]])
def test_ablation_options_run(tiny_pipeline_dir, emb_cache, tmp_path, flags):
    run = tmp_path / "run"
    res = cli(*common(tiny_pipeline_dir, emb_cache, steps=2), *flags, "--output", str(run))
    assert res.exit_code == 0, res.output
    routing = json.loads((run / "routing.json").read_text())
    rows = metrics(run)
    if "--no-distill" in flags:
        assert all(r["loss_distill_block"] == 0 for r in rows)
    if "--no-optimal-transport" in flags:  # the paper's ablation: no assignment loss toward the nearest code
        assert all(r["loss_assign"] == 0 for r in rows) and any(r["loss_contrastive"] != 0 for r in rows)
    if "uni-arch-paper" in flags:  # the paper's baseline: the single code trains from the first step
        assert routing["num_codes"] == 1
        assert [r["phase"] for r in rows] == ["uni-arch"] * 4
        assert all(r["loss_contrastive"] == 0 and r["loss_assign"] == 0 for r in rows)
    if {"weight-norm", "taylor", "bk-sdm"} & set(flags):  # static: no training, one architecture under the budget
        assert rows == [] and routing["num_codes"] == 1
        assert 0.7 <= routing["mean_macs_ratio"] <= 0.78
    if "bk-sdm" in flags:  # block pairs ranked by output sensitivity; some removed, the rest by widths
        blocks = routing["static"]["blocks"]
        assert len(blocks) >= 4 and any(b["removed"] for b in blocks) and not all(b["removed"] for b in blocks)
        assert all(b["sensitivity"] > 0 for b in blocks)
    if flags == ["--method", "uni-arch"]:
        # the same warm-up as aptp, then the single code (started at the medoid of the predicted architectures)
        assert routing["num_codes"] == 1
        assert [r["phase"] for r in rows] == ["warmup"] * 2 + ["uni-arch"] * 2
        assert all(r["loss_contrastive"] == 0 for r in rows[2:])


def test_min_snr_and_centred_routing_settings(tiny_pipeline_dir, emb_cache, tmp_path):
    """prune.snr_gamma reweights the task loss (same samples: unweighted terms equal, total differs);
    router.similarity=centred trains and is stored with the router."""
    base, snr = tmp_path / "base", tmp_path / "snr"
    assert cli(*common(tiny_pipeline_dir, emb_cache, steps=2), "--output", str(base)).exit_code == 0
    res = cli(*common(tiny_pipeline_dir, emb_cache, steps=2), "--set", "prune.snr_gamma=5",
              "--set", "router.similarity=centred", "--output", str(snr))
    assert res.exit_code == 0, res.output
    a, b = metrics(base)[0], metrics(snr)[0]  # step 1: warm-up, the same batch, noise and timesteps
    assert a["loss_ddpm"] == pytest.approx(b["loss_ddpm"], rel=1e-5)
    assert a["loss"] != pytest.approx(b["loss"], rel=1e-3)
    assert json.loads((snr / "router" / "config.json").read_text())["similarity"] == "centred"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(snr))
    bad = cli(*common(tiny_pipeline_dir, emb_cache, steps=2), "--set", "prune.snr_gamma=0",
              "--output", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("per", ["batch", "expert"])
def test_resource_per_sets_what_meets_the_budget(tiny_pipeline_dir, emb_cache, tmp_path, monkeypatch, per):
    """prune.resource_per: 'batch' (Eq. 26 on the routed mean MACs, the paper) or 'expert' (Eq. 26 on every
    sample's architecture, then the mean): the resource loss sees one ratio or one per sample, and the
    logged loss is their mean."""
    import aptp.train.prune as prune_module

    seen = []
    real = prune_module.resource_loss

    def spy(ratio, budget):
        out = real(ratio, budget)
        seen.append((tuple(ratio.shape), float(out.detach().mean())))
        return out

    monkeypatch.setattr(prune_module, "resource_loss", spy)
    run = tmp_path / "run"
    res = cli(*common(tiny_pipeline_dir, emb_cache, steps=2), "--set", f"prune.resource_per={per}", "--output", str(run))
    assert res.exit_code == 0, res.output
    rows = metrics(run)
    assert len(seen) == len(rows) == 4
    assert all(shape == (() if per == "batch" else (8,)) for shape, _ in seen)  # batch 8
    assert [r["loss_resource"] for r in rows] == pytest.approx([v for _, v in seen], rel=1e-6)
    assert f"resource_per: {per}" in (run / "settings.yaml").read_text()  # the run records it


def test_bad_input_is_one_line(tiny_pipeline_dir, emb_cache, tmp_path):
    for args, needle in ((["--budget", "1.5"], "budget"), (["--data", str(tmp_path / "nope")], "nope"),
                         (["--resolution", "20"], "multiple of 8")):
        res = cli(*common(tiny_pipeline_dir, emb_cache), *args, "--output", str(tmp_path / "r"))
        assert res.exit_code == 2, res.output
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0], res.stderr


def _subprocess(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + ["-m", "aptp", "prune", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_matches_uninterrupted(tiny_pipeline_dir, emb_cache, tmp_path):
    args = common(tiny_pipeline_dir, emb_cache, steps=8) + ["--quiet"]
    full = _subprocess(args + ["--output", str(tmp_path / "full")])
    killed = _subprocess(args + ["--output", str(tmp_path / "killed")])
    target = tmp_path / "killed" / "checkpoints" / "step-000004"
    deadline = time.time() + 240
    while not target.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    assert target.exists(), killed.communicate()[0]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert full.wait(timeout=300) == 0, full.communicate()[0]
    assert not (tmp_path / "killed" / "routing.json").exists()  # it really died before the end

    # the budget target is the checkpoint's: resuming with another budget is refused
    refused = cli(*common(tiny_pipeline_dir, emb_cache, steps=8), "--budget", "0.5", "--resume",
                  "--output", str(tmp_path / "killed"))
    assert refused.exit_code == 2 and "budget" in refused.stderr

    resumed = cli(*common(tiny_pipeline_dir, emb_cache, steps=8), "--resume", "--quiet",
                  "--output", str(tmp_path / "killed"))
    assert resumed.exit_code == 0, resumed.output
    a = load_file(str(tmp_path / "full" / "codes.safetensors"))["logits"]
    b = load_file(str(tmp_path / "killed" / "codes.safetensors"))["logits"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    steps = [r["step"] for r in metrics(tmp_path / "killed")]
    assert steps == list(range(1, 11))  # no duplicated or missing log lines
    info = json.loads((tmp_path / "killed" / "checkpoints" / "step-000010" / "trainer.json").read_text())
    assert info["budget"] == 0.78 and info["step"] == 10


def test_ctrl_c_checkpoints_the_step_and_resumes(tiny_pipeline_dir, emb_cache, tmp_path):
    """SIGINT: the step in progress ends, is checkpointed (also between checkpoint steps), exit 130;
    --resume then finishes with every step logged once."""
    run = tmp_path / "run"
    args = common(tiny_pipeline_dir, emb_cache, steps=8) + ["--set", "prune.checkpoint_every=4", "--quiet"]
    proc = _subprocess(args + ["--output", str(run)])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(metrics(run)) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130, out
    stopped = metrics(run)[-1]["step"]
    assert f"interrupted at step {stopped}" in out and stopped < 10
    assert int(latest_checkpoint(run).name.split("-")[1]) == stopped  # this very step was saved
    assert not (run / "routing.json").exists()
    resumed = cli(*args, "--resume", "--output", str(run))
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in metrics(run)] == list(range(1, 11)) and (run / "routing.json").is_file()


def test_two_processes_train_what_one_process_trains(tiny_pipeline_dir, emb_cache, tmp_path):
    """`accelerate launch` with 2 gloo processes × batch 4 ≡ 1 process × batch 8 (same global batch
    and seed). On a machine without GPUs accelerate's multi-process launcher (`--multi_gpu`, which
    runs torchrun) falls back to gloo on the CPU; its `--cpu` flag alone starts one process unless
    MPI is installed (`--mpirun_hostfile`)."""
    # Gradients agree to float rounding (~1e-8); Adam turns rounding noise on near-zero gradients
    # into updates of up to ~lr/2, so this compares at the paper's lr with tolerances of that size.
    base = common(tiny_pipeline_dir, emb_cache, steps=3)
    base[base.index("prune.lr=0.05")] = "prune.lr=0.0002"
    one = _subprocess(base + ["--output", str(tmp_path / "one"), "--quiet"])
    assert one.wait(timeout=300) == 0, one.communicate()[0]
    i = base.index("--batch-size")
    two_args = base[:i] + ["--batch-size", "4"] + base[i + 2 :]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29531"]
    two = _subprocess(two_args + ["--output", str(tmp_path / "two"), "--quiet"], launcher=launcher)
    out = two.communicate(timeout=300)[0]
    assert two.returncode == 0, out
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 5
    lr = 2e-4 * 8 ** 0.5  # lr_scaling sqrt-batch: the rate follows the global batch, 8 in both runs
    for r1, r2 in zip(m1, m2):
        for k in LOSSES + ("macs_ratio",):
            assert r1[k] == pytest.approx(r2[k], rel=1e-3, abs=1e-6), (r1["step"], k)
        assert r1["lr"] == pytest.approx(r2["lr"], rel=1e-12) and r1["lr"] <= lr * (1 + 1e-12)
    assert m1[-1]["lr"] == pytest.approx(lr)
    a = load_file(str(tmp_path / "one" / "codes.safetensors"))["logits"]
    b = load_file(str(tmp_path / "two" / "codes.safetensors"))["logits"]
    # Adam moves each element by at most ~lr per step: 3 code steps bound the drift by 3·lr
    torch.testing.assert_close(a, b, atol=3 * lr, rtol=0)
    assert (a - b).abs().max() < 0.1 * (a - 3.0).abs().max()  # far below the codes' own movement


def test_budget_is_counted_at_the_macs_resolution(tiny_pipeline_dir, emb_cache, tmp_path):
    """Issue 12: the budget holds at `space.macs_resolution` (the deployment size), not at the
    training resolution; experts.json says which, and inspect-model --vector agrees independently."""
    run = tmp_path / "wn"
    args = common(tiny_pipeline_dir, emb_cache) + ["--method", "weight-norm", "--budget", "0.6",
                                                    "--set", "space.macs_resolution=64", "--quiet"]
    res = cli(*args, "--output", str(run))
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(app, ["materialize", str(run), "--quiet"], env={"HF_HUB_OFFLINE": "1"}).exit_code == 0
    info = json.loads((run / "experts.json").read_text())
    assert (info["macs_resolution"], info["train_resolution"]) == (64, 16)
    assert json.loads((run / "routing.json").read_text())["macs_resolution"] == 64
    ratio = info["experts"][0]["macs_ratio"]
    assert 0.59 <= ratio <= 0.6

    def inspected(resolution: int) -> float:
        out = CliRunner().invoke(app, ["inspect-model", "--model", str(tiny_pipeline_dir), "--resolution",
                                       str(resolution), "--vector", str(run / "experts" / "expert-0" / "plan.json"),
                                       "--format", "json"], env={"HF_HUB_OFFLINE": "1"})
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)["vector"]["macs_ratio"]

    assert inspected(64) == pytest.approx(ratio, abs=1e-6)  # float32 in the report
    assert abs(inspected(16) - ratio) > 1e-3  # the same architecture costs a different share at 16 px


def test_code_lr_scale_moves_the_code_logits_faster(tiny_pipeline_dir, emb_cache, tmp_path):
    """prune.code_lr_scale multiplies the learning rate of the code logits only: one AdamW step from the
    same seeded start moves a logit by lr x scale x g / (|g| + eps) (Adam's first step), so runs at scale 1
    and 4 differ by at most 3 x lr, and by 3 x lr where the gradient is well above eps."""
    lr = 0.05 * 8 ** 0.5  # common(): prune.lr 0.05 x sqrt(batch 8)
    codes = []
    for scale in (1, 4):
        run = tmp_path / f"s{scale}"
        res = cli(*common(tiny_pipeline_dir, emb_cache, steps=1, warmup=0), "--method", "uni-arch-paper",
                  "--set", f"prune.code_lr_scale={scale}", "--output", str(run))
        assert res.exit_code == 0, res.output
        codes.append(load_file(str(run / "codes.safetensors"))["logits"].double())
    diff = (codes[0] - codes[1]).abs()
    assert diff.max() <= 3 * lr * (1 + 1e-4)
    assert diff.max() == pytest.approx(3 * lr, rel=1e-4)
    assert (diff > 2.9 * lr).float().mean() > 0.5  # most logits, not one


def test_resume_from_a_one_group_checkpoint(tiny_pipeline_dir, emb_cache, tmp_path):
    """Checkpoints written before prune.code_lr_scale hold one AdamW group for the whole router.
    Resuming such a checkpoint splits the group (each parameter keeps its Adam moments) and trains
    on exactly as a run that was never interrupted (at scale 1, what those runs trained with)."""
    args = [*common(tiny_pipeline_dir, emb_cache, steps=6), "--set", "prune.keep_checkpoints=10", "--quiet"]
    full = cli(*args, "--output", str(tmp_path / "full"))
    assert full.exit_code == 0, full.output
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    for f in (tmp_path / "full").iterdir():  # the settings and the log, as the older run left them
        if f.is_file() and f.name in ("settings.json", "metrics.jsonl"):
            (old / f.name).write_bytes(f.read_bytes())
    src = tmp_path / "full" / "checkpoints" / "step-000004"
    dst = old / "checkpoints" / "step-000004"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    state = torch.load(dst / "state.pt", weights_only=False)
    rest, codes = state["optimizer"]["param_groups"]
    assert rest["lr"] == codes["lr"]  # scale 1: the one group the older code had
    ids = sorted(rest["params"] + codes["params"])  # codes.logits is the router's last parameter
    assert codes["params"] == [ids[-1]]
    state["optimizer"]["param_groups"] = [{**rest, "params": ids}]
    for key in ("base_lrs", "_last_lr"):
        state["lr_schedule"][key] = state["lr_schedule"][key][:1]
    torch.save(state, dst / "state.pt")

    resumed = cli(*args, "--resume", "--output", str(old))
    assert resumed.exit_code == 0, resumed.output
    a = load_file(str(tmp_path / "full" / "codes.safetensors"))["logits"]
    b = load_file(str(old / "codes.safetensors"))["logits"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    after = torch.load(old / "checkpoints" / "step-000008" / "state.pt", weights_only=False)
    assert len(after["optimizer"]["param_groups"]) == 2


def test_cached_latents_train_what_the_vae_trains(tiny_pipeline_dir, emb_cache, tmp_path, monkeypatch):
    """data.cache_latents changes where the VAE posterior comes from, not what is trained: the same
    losses step by step (to the rounding of the VAE run on other batches) and the same codes."""
    from aptp.train.latents import LatentCache

    calls = []
    lookup = LatentCache.lookup
    monkeypatch.setattr(LatentCache, "lookup", lambda self, index: calls.append(len(index)) or lookup(self, index))
    base = common(tiny_pipeline_dir, emb_cache, steps=3) + ["--quiet"]
    base[base.index("prune.lr=0.05")] = "prune.lr=0.0002"  # rounding noise is not amplified to lr/2 jumps
    cache = tmp_path / "latents"
    for name, extra in (("vae", []), ("cached", ["--set", "data.cache_latents=true",
                                                 "--set", f"data.latent_cache_dir={cache}"])):
        res = cli(*base, *extra, "--output", str(tmp_path / name))
        assert res.exit_code == 0, res.output
    a, b = metrics(tmp_path / "vae"), metrics(tmp_path / "cached")
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):
        for key in LOSSES:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-7), (ra["step"], key)
    torch.testing.assert_close(load_file(str(tmp_path / "cached" / "codes.safetensors"))["logits"],
                               load_file(str(tmp_path / "vae" / "codes.safetensors"))["logits"], atol=1e-5, rtol=1e-5)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1  # 48 images, one cache
    assert calls == [8] * 5  # every step of the cached run read the cache
    # with the cache built, the loop reads captions and indices only: one image drawn (the size probe), not 5 x 8
    import aptp.data.shapes_world as world

    drawn = []
    render = world.render
    monkeypatch.setattr(world, "render", lambda *a, **k: drawn.append(1) or render(*a, **k))
    res = cli(*base, *extra, "--output", str(tmp_path / "again"))
    assert res.exit_code == 0, res.output
    assert len(drawn) == 1


def test_a_missed_budget_is_a_warning(tiny_pipeline_dir, emb_cache, tmp_path):
    """One step of uni-arch-paper cannot leave keep-all: prune warns (stderr, also with --quiet) and
    routing.json says budget_met false; weight-norm meets the budget by construction and does not warn."""
    missed = cli(*common(tiny_pipeline_dir, emb_cache, steps=1, warmup=0), "--method", "uni-arch-paper",
                 "--budget", "0.5", "--quiet", "--output", str(tmp_path / "missed"))
    assert missed.exit_code == 0, missed.output
    r = json.loads((tmp_path / "missed" / "routing.json").read_text())
    assert r["budget_met"] is False and r["mean_macs_ratio"] > 0.9
    warning = [line for line in missed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "from the budget 0.5" in warning[0], missed.stderr
    met = cli(*common(tiny_pipeline_dir, emb_cache), "--method", "weight-norm", "--budget", "0.5", "--quiet",
              "--output", str(tmp_path / "met"))
    assert met.exit_code == 0, met.output
    r = json.loads((tmp_path / "met" / "routing.json").read_text())
    assert r["budget_met"] is True and abs(r["mean_macs_ratio"] - 0.5) <= 0.01
    assert "warning:" not in met.stderr
