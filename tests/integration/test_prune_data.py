"""`aptp prune` end to end on each real data-set layout (tiny fixtures in the real schemas), and the
bad inputs of issue 4, each one line on stderr with exit code 2."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_prune import cli, common, emb_cache  # noqa: F401  (fixture)
from tests.unit.test_data import cc3m_downloader_root, cc3m_tsv_root, coco_root, shard_root  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def small(pipe, cache) -> list[str]:
    args = common(pipe, cache, steps=1, warmup=1, batch=4)
    return args + ["--experts", "2"]


@pytest.mark.parametrize("layout", ["coco", "cc3m-tsv", "cc3m-shards", "cc3m-downloader"])
def test_two_step_prune_on_each_layout(layout, request, tiny_pipeline_dir, emb_cache, tmp_path):  # noqa: F811
    fixture, name = {"coco": ("coco_root", "coco"), "cc3m-tsv": ("cc3m_tsv_root", "cc3m"),
                     "cc3m-shards": ("shard_root", "cc3m"),
                     "cc3m-downloader": ("cc3m_downloader_root", "cc3m")}[layout]
    root = request.getfixturevalue(fixture)
    run = tmp_path / "run"
    res = cli(*small(tiny_pipeline_dir, emb_cache), "--data", name, "--data-root", str(root), "--output", str(run))
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    routing = json.loads((run / "routing.json").read_text())
    assert routing["num_codes"] == 2
    if layout != "coco":  # the CC3M fixtures hold a missing and a truncated image: skipped, counted
        assert routing["skipped_images"] > 0
        assert f"skipped unreadable images: {routing['skipped_images']}" in res.stdout


def test_bad_input_is_one_line_and_exit_2(tiny_pipeline_dir, emb_cache, tmp_path):  # noqa: F811
    empty = tmp_path / "empty-coco"
    empty.mkdir()
    cases = [
        (["--budget", "0"], "budget"),
        (["--budget", "-0.2"], "budget"),
        (["--budget", "1.01"], "budget"),
        (["--experts", "0"], "experts"),
        (["--experts", "8", "--batch-size", "4"], "experts"),
        (["--data", "coco", "--data-root", str(empty)], "captions_train2014.json"),
        (["--data", "cc3m", "--data-root", str(empty)], str(empty)),
        (["--prompt-encoder", "no-such-encoder-xyz"], "no-such-encoder-xyz"),
    ]
    for args, needle in cases:
        experts = [] if "--experts" in args else ["--experts", "2"]
        res = cli(*common(tiny_pipeline_dir, emb_cache, batch=4), *experts, *args, "--output", str(tmp_path / "r"))
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, res.stderr)
        assert not (tmp_path / "r" / "metrics.jsonl").exists()
