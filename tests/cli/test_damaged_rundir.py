"""A damaged file in a run directory is one line naming the file and the command that rebuilds it
(exit 2), never an internal error; following the line's advice repairs the run (issue 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aptp.cli.main import app

pytestmark = pytest.mark.integration


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def pristine(tiny_pipeline_dir, tmp_path_factory):
    """A tiny run: pruned (checkpoints), materialized (2 experts), expert 0 fine-tuned 1 step."""
    root = tmp_path_factory.mktemp("damaged")
    run = root / "run"
    res = cli("prune", "--model", tiny_pipeline_dir, "--resolution", "16", "--batch-size", "8",
              "--warmup-steps", "1", "--steps", "2", "--experts", "2", "--output", run, "--quiet",
              "--set", "data.max_samples=32", "--set", f"router.embedding_cache={root / 'emb'}",
              "--set", "prune.checkpoint_every=1", "--set", "prune.lr_warmup_steps=1")
    assert res.exit_code == 0, res.output
    assert cli("materialize", run, "--quiet").exit_code == 0
    res = cli("finetune", run, "--expert", "0", "--steps", "1", "--batch-size", "2", "--quiet")
    assert res.exit_code == 0, res.output
    return run


@pytest.fixture()
def run(pristine, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    path.write_text('{"format": "aptp', encoding="utf-8")


def newest(folder: Path) -> Path:
    return sorted(folder.glob("step-*"))[-1]


GEN = ("--scheduler", "ddim", "--steps", "1", "--overwrite")


def prune_hint(run: Path) -> str:
    return f"aptp prune --recipe {run / 'settings.yaml'} --output {run} --resume"


# (file relative to the run, damage, command after RUN, what the hint must say)
CASES = {
    "codes": ("codes.safetensors", truncate, ("route", "{run}", "a red circle"), prune_hint),
    "codes-garbage": ("codes.safetensors", garble, ("route", "{run}", "a red circle"), prune_hint),
    "predictor": ("router/predictor.safetensors", truncate, ("route", "{run}", "a red circle"), prune_hint),
    "router-config": ("router/config.json", garble, ("route", "{run}", "a red circle"), prune_hint),
    "arch-space": ("arch_space.json", garble, ("materialize", "{run}", "--overwrite", "--quiet"), prune_hint),
    "experts-json": ("experts.json", garble, ("route", "{run}", "a red circle"),
                     lambda run: f"aptp materialize {run} --overwrite"),
    "experts-json-shape": ("experts.json", lambda p: p.write_text("[1, 2]"), ("route", "{run}", "a red circle"),
                           lambda run: f"aptp materialize {run} --overwrite"),
    "plan": ("experts/expert-1/plan.json", garble,
             ("generate", "{run}", "a red circle", "--expert", "1", "--weights", "initial", *GEN),
             lambda run: f"aptp materialize {run} --overwrite"),
    "expert-weights": ("experts/expert-1/model.safetensors", truncate,
                       ("generate", "{run}", "a red circle", "--expert", "1", "--weights", "initial", *GEN),
                       lambda run: f"aptp materialize {run} --overwrite"),
    "finetuned-weights": ("finetuned/expert-0/model.safetensors", truncate,
                          ("generate", "{run}", "a red circle", "--expert", "0", *GEN),
                          lambda run: f"aptp finetune {run} --expert 0 --overwrite"),
    "prune-checkpoint": ("checkpoints/{newest}/state.pt", truncate,
                         ("prune", "--recipe", "{run}/settings.yaml", "--output", "{run}", "--resume", "--quiet"),
                         lambda run: f"delete {newest(run / 'checkpoints')} and rerun {prune_hint(run)}"),
    "prune-checkpoint-info": ("checkpoints/{newest}/trainer.json", garble,
                              ("prune", "--recipe", "{run}/settings.yaml", "--output", "{run}", "--resume",
                               "--quiet"),
                              lambda run: f"delete {newest(run / 'checkpoints')} and rerun {prune_hint(run)}"),
    "finetune-checkpoint": ("finetune/expert-0/checkpoints/{newest}/state.pt", truncate,
                            ("finetune", "{run}", "--expert", "0", "--steps", "1", "--batch-size", "2", "--resume",
                             "--quiet"),
                            lambda run: f"delete {newest(run / 'finetune/expert-0/checkpoints')} and rerun "
                                        f"aptp finetune {run} --expert 0 --resume"),
}


def damage(run: Path, rel: str, how) -> Path:
    if "{newest}" in rel:
        folder = run / rel.split("/{newest}")[0]
        rel = rel.replace("{newest}", newest(folder).name)
    path = run / rel
    assert path.is_file(), path
    how(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_file_is_one_line_naming_it_and_the_fix(case, run):
    rel, how, command, hint = CASES[case]
    path = damage(run, rel, how)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = cli(*[c.replace("{run}", str(run)) for c in command])
    lines = [x for x in res.stderr.splitlines() if x.strip() and not x.startswith(("Loading", "Fetching"))]
    errors = [x for x in lines if x.startswith("error:") or "internal error" in x]
    assert res.exit_code == 2, res.output
    assert len(errors) == 1, res.stderr
    assert f"error: {path} is damaged (" in errors[0], errors[0]
    assert errors[0].endswith(hint(run)) or hint(run) + " " in errors[0], errors[0]
    # nothing that was on disk has changed
    assert all(p.read_bytes() == data for p, data in before.items() if p.exists()), case
    assert all(p.exists() for p in before), case


def test_following_the_hints_repairs_the_run(run):
    damage(run, "codes.safetensors", truncate)
    garble(run / "routing.json")
    garble(run / "arch_space.json")
    res = cli("prune", "--recipe", run / "settings.yaml", "--output", run, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    assert cli("route", run, "a red circle").exit_code == 0
    assert json.loads((run / "routing.json").read_text())["num_codes"] == 2
    json.loads((run / "arch_space.json").read_text())

    garble(run / "experts/expert-1/plan.json")
    garble(run / "experts.json")
    res = cli("materialize", run, "--overwrite", "--quiet")
    assert res.exit_code == 0, res.output
    res = cli("generate", run, "a red circle", "--expert", "1", "--weights", "initial", *GEN)
    assert res.exit_code == 0, res.output

    ckpt = newest(run / "checkpoints")
    truncate(ckpt / "state.pt")
    shutil.rmtree(ckpt)  # what the hint says; the run continues from the checkpoint before
    res = cli("prune", "--recipe", run / "settings.yaml", "--output", run, "--resume", "--quiet")
    assert res.exit_code == 0, res.output


def test_rundir_routing_json(run):
    from aptp.rundir import DamagedFileError, RunDir

    assert RunDir(run).routing()["num_codes"] == 2
    garble(run / "routing.json")
    with pytest.raises(DamagedFileError, match="routing.json is damaged .*aptp prune --recipe"):
        RunDir(run).routing()
