"""`aptp inspect-experts` on a tiny pruned and materialized run: every format, the PNGs, no overwrite."""

from __future__ import annotations

import csv
import io
import json

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from aptp.cli.inspect_experts import inspect_experts
from aptp.cli.main import app as main_app

pytestmark = pytest.mark.integration

# a local app, so this test does not depend on the command being registered in aptp.cli.main
app = typer.Typer(pretty_exceptions_enable=False)
app.command("inspect-experts")(inspect_experts)


@app.callback()
def _root() -> None:
    """Keep `inspect-experts` a named subcommand."""


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


@pytest.fixture(scope="module")
def run(tiny_pipeline_dir, tmp_path_factory):
    """A tiny run on shapes: prune 6 steps into 3 experts, then materialize."""
    root = tmp_path_factory.mktemp("inspect")
    run = root / "run"
    runner = CliRunner()
    res = runner.invoke(main_app, [
        "prune", "--model", str(tiny_pipeline_dir), "--resolution", "16", "--batch-size", "8",
        "--warmup-steps", "2", "--steps", "6", "--experts", "3", "--output", str(run), "--quiet",
        "--set", "data.max_samples=40", "--set", f"router.embedding_cache={root / 'emb'}",
        "--set", "prune.lr=0.5", "--set", "prune.lr_warmup_steps=1", "--set", "prune.budget=0.5"],
        env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    res = runner.invoke(main_app, ["materialize", str(run), "--quiet"], env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    return run


def test_markdown_csv_and_json_agree(run):
    experts = json.loads((run / "experts.json").read_text())["experts"]
    ratio = {e["expert"]: e["macs_ratio"] for e in experts}

    md = cli("inspect-experts", str(run), "--format", "markdown", "--top-k", "3", "-q")
    assert md.exit_code == 0, md.output
    lines = md.stdout.splitlines()
    assert lines[0] == "| expert | MACs ratio | params | prompts | share | most frequent words | tiers |"
    rows = [line.split(" | ") for line in lines[2:]]
    assert len(rows) == 3
    shown = [float(r[1]) for r in rows]
    assert shown == sorted(shown)  # ordered by MACs ratio, as the paper's tables

    table = list(csv.DictReader(io.StringIO(cli("inspect-experts", str(run), "--format", "csv", "--top-k", "3",
                                                "-q").stdout)))
    assert len(table) == 3 and "word_3" in table[0] and "tier_hardest" in table[0]
    assert sum(int(r["prompts"]) for r in table) == 40  # max_samples of the validation split
    for r in table:
        assert float(r["macs_ratio"]) == pytest.approx(ratio[int(r["expert"])])
        tiers = [float(r[f"tier_{t}"]) for t in ("easy", "medium", "hard", "hardest")]
        assert sum(tiers) == pytest.approx(1.0) or int(r["prompts"]) == 0
        words = [r[f"word_{i}"] for i in (1, 2, 3) if r[f"word_{i}"]]
        assert not {"a", "the", "of", "in", "on"} & set(words)
        counts = [int(r[f"count_{i}"]) for i in (1, 2, 3) if r[f"count_{i}"]]
        assert counts == sorted(counts, reverse=True) and all(c <= int(r["prompts"]) for c in counts)

    js = cli("inspect-experts", str(run), "--format", "json", "--sort", "expert", "--split", "train", "--limit", "20", "-q")
    assert js.exit_code == 0, js.output
    data = json.loads(js.stdout)
    assert data["split"] == "train" and data["prompts"] == 20 and data["count"] == "prompt"
    assert [e["expert"] for e in data["experts"]] == [0, 1, 2]
    for e in data["experts"]:
        blocks = e["block_macs_ratio"]
        assert list(blocks)[:4] == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3"]
        assert "mid_block" in blocks and blocks["other"] == pytest.approx(1.0)
        assert all(0 <= v <= 1 for v in blocks.values())
        # the expert's ratio is the MACs-weighted mean of its block ratios
        assert min(blocks.values()) <= e["macs_ratio"] <= max(blocks.values())

    tab = cli("inspect-experts", str(run), "-q")
    assert tab.exit_code == 0 and "most frequent words" in tab.stdout and "MACs ratio" in tab.stdout


def test_plots_are_written_and_never_overwritten(run, tmp_path):
    plots = tmp_path / "plots"
    res = cli("inspect-experts", str(run), "--format", "markdown", "--plots", str(plots), "--samples", "1",
              "--steps", "1", "--weights", "initial", "-q")
    assert res.exit_code == 0, res.output
    names = ["block_macs.png", "samples.png", "shares.png", "tier_mix.png", "training.png"]
    assert sorted(p.name for p in plots.iterdir()) == names
    for n in names:
        with Image.open(plots / n) as im:
            assert im.format == "PNG" and im.size[0] > 200
    before = (plots / "shares.png").stat().st_mtime_ns
    again = cli("inspect-experts", str(run), "--plots", str(plots), "--samples", "0", "-q")
    assert again.exit_code == 2
    err = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "--overwrite" in err[0] and "block_macs.png" in err[0]
    assert (plots / "shares.png").stat().st_mtime_ns == before
    forced = cli("inspect-experts", str(run), "--plots", str(plots), "--samples", "0", "--overwrite", "-q")
    assert forced.exit_code == 0, forced.output
    assert (plots / "shares.png").stat().st_mtime_ns != before


def test_bad_input_is_one_line(run, tmp_path):
    res = cli("inspect-experts", str(tmp_path))
    assert res.exit_code == 2 and res.stderr.strip().startswith("error:") and "not a run directory" in res.stderr
    (tmp_path / "file").write_text("x")
    res = cli("inspect-experts", str(run), "--plots", str(tmp_path / "file"))
    assert res.exit_code == 2 and "not a folder" in res.stderr
    assert cli("inspect-experts", str(run), "--top-k", "0").exit_code == 2
    assert cli("inspect-experts", str(run), "--weights", "best").exit_code == 2
