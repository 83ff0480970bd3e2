"""Deterministic global batches and atomic checkpoints."""

from __future__ import annotations

import json

import torch

from aptp.train.batches import GlobalBatchSampler, global_batch
from aptp.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def test_split_batches_equal_the_whole_batch():
    pool = list(range(100, 137))  # 37 items
    one = list(GlobalBatchSampler(pool, 8, 1, 0, seed=3, start=0, stop=9))
    two = [list(GlobalBatchSampler(pool, 4, 2, r, seed=3, start=0, stop=9)) for r in range(2)]
    for m in range(9):
        assert one[m] == two[0][m] + two[1][m]
    assert all(set(b) <= set(pool) for b in one)


def test_resume_continues_the_same_order_and_epochs_cover_the_pool():
    pool = list(range(40))
    full = list(GlobalBatchSampler(pool, 8, 1, 0, seed=0, start=0, stop=10))
    tail = list(GlobalBatchSampler(pool, 8, 1, 0, seed=0, start=6, stop=10))
    assert full[6:] == tail
    first_epoch = sorted(i for b in full[:5] for i in b)
    assert first_epoch == pool  # 5 batches of 8 = one permutation of 40
    assert full[:5] != full[5:10]  # a new permutation each epoch
    assert global_batch(3, 8, 0, 0) and len(global_batch(3, 8, 0, 0)) == 8  # tiny pools wrap


def test_checkpoints_keep_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"budget": 0.78}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000006", "step-000008"]
    state, info = load_checkpoint(latest_checkpoint(tmp_path))
    assert info == {"step": 8, "budget": 0.78} and torch.equal(state["w"], torch.full((2,), 8.0))
    (tmp_path / "checkpoints" / ".step-000010.tmp").mkdir()  # a write killed half-way is ignored
    assert latest_checkpoint(tmp_path).name == "step-000008"


def test_end_of_step_logs_checkpoints_and_stops(tmp_path):
    from aptp.train.checkpoint import end_of_step

    saved, logged, shown = [], [], []
    metrics = tmp_path / "metrics.jsonl"

    def step(n, stop=False, main=True):
        return end_of_step(n, 7, {"step": n}, main=main, metrics=metrics, log_every=2, checkpoint_every=3,
                           checkpoint=lambda: saved.append(n), stop_requested=lambda: stop,
                           log=logged.append, progress=lambda s, t, r: shown.append((s, t)))

    assert [step(n) for n in range(1, 8)] == [False] * 7
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [2, 4, 6, 7]  # and the last
    assert [r["step"] for r in logged] == [2, 4, 6, 7] and shown == [(n, 7) for n in range(1, 8)]
    assert saved == [3, 6, 7]
    saved.clear()
    assert step(4, stop=True) is True and saved == [4]  # interrupted between checkpoints: one written
    saved.clear()
    assert step(6, stop=True) is True and saved == [6]  # on a checkpoint step: not written twice
    saved.clear()
    shown.clear()
    assert step(2, main=False) is False and saved == [] and shown == []  # other ranks neither log nor show
    assert len(metrics.read_text().splitlines()) == 6


def test_stop_on_sigint_sets_the_flag_and_restores_the_handler():
    import os
    import signal

    from aptp.train.checkpoint import stop_on_sigint

    before = signal.getsignal(signal.SIGINT)
    with stop_on_sigint(True) as flag:
        assert flag["stop"] is False
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the loop finishes its step
        assert flag["stop"] is True
    assert signal.getsignal(signal.SIGINT) is before
    with stop_on_sigint(False) as flag:  # ranks > 0 leave the handler alone
        assert signal.getsignal(signal.SIGINT) is before and flag["stop"] is False
