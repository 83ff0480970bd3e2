"""Atomic writes, output directories, run metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import aptp.io as aio
from aptp.errors import AptpUserError, OutputExistsError, SettingsError
from aptp.io import (
    atomic_path,
    atomic_save_file,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    prepare_output_dir,
    run_metadata,
)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_writers_create_parents_and_leave_no_temp_files(tmp_path):
    d = tmp_path / "a" / "b"
    atomic_write_bytes(d / "x.bin", b"\x00\x01")
    atomic_write_text(d / "x.txt", "héllo\n")
    atomic_write_json(d / "x.json", {"k": [1, 2.5, None]})
    atomic_write_yaml(d / "x.yaml", {"b": 1, "a": [True, "no"]})
    assert (d / "x.bin").read_bytes() == b"\x00\x01"
    assert (d / "x.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((d / "x.json").read_text()) == {"k": [1, 2.5, None]}
    assert yaml.safe_load((d / "x.yaml").read_text()) == {"b": 1, "a": [True, "no"]}
    assert (d / "x.yaml").read_text().startswith("b: 1\n")  # mapping order kept
    assert _names(d) == ["x.bin", "x.json", "x.txt", "x.yaml"]


def test_new_file_gets_umask_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "f.txt", "x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~aio._current_umask()


@pytest.mark.parametrize(
    ("write", "bad", "exc"),
    [
        (atomic_write_json, {"x": object()}, TypeError),
        (atomic_write_yaml, {"x": Path("p")}, yaml.YAMLError),
    ],
)
def test_failed_serialisation_leaves_original_intact(tmp_path, write, bad, exc):
    path = tmp_path / "out"
    path.write_text("original")
    with pytest.raises(exc):
        write(path, bad)
    assert path.read_text() == "original"
    assert _names(tmp_path) == ["out"]


def test_failure_while_writing_removes_temp_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"original")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert path.read_bytes() == b"original"
    assert _names(tmp_path) == ["out.bin"]


def test_failure_at_rename_removes_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("original")

    def boom(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(aio.os, "replace", boom)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_text(path, "new")
    assert path.read_text() == "original"
    assert _names(tmp_path) == ["out.txt"]


def test_atomic_save_file_round_trip_and_failure(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, safe_open

    g = torch.Generator("cpu").manual_seed(0)
    tensors = {"w": torch.randn(3, 4, generator=g), "b": torch.arange(4)}
    path = atomic_save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"k": "v"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(path, "pt") as fh:
        assert fh.metadata() == {"k": "v"}

    before = path.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError, match="share memory"):  # safetensors refuses these
        atomic_save_file({"a": shared, "b": shared}, path)
    assert path.read_bytes() == before
    assert _names(path.parent) == ["model.safetensors"]


def test_prepare_output_dir_creates_missing_and_accepts_empty(tmp_path):
    new = prepare_output_dir(tmp_path / "runs" / "r1", overwrite=False, resume=False)
    assert new.is_dir()
    assert prepare_output_dir(new, overwrite=False, resume=False) == new


def test_prepare_output_dir_refuses_non_empty_and_keeps_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "settings.yaml").write_text("seed: 1\n")
    with pytest.raises(OutputExistsError) as info:
        prepare_output_dir(run, overwrite=False, resume=False)
    msg = str(info.value)
    assert isinstance(info.value, AptpUserError)
    assert str(run) in msg and "--overwrite" in msg and "--resume" in msg
    assert (run / "settings.yaml").read_text() == "seed: 1\n"
    assert (run / "checkpoints").is_dir()


def test_prepare_output_dir_overwrite_and_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "old.txt").write_text("x")
    assert prepare_output_dir(run, overwrite=False, resume=True) == run
    assert (run / "old.txt").exists()
    assert prepare_output_dir(run, overwrite=True, resume=False) == run
    assert run.is_dir() and not any(run.iterdir())


def test_prepare_output_dir_bad_combinations(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        prepare_output_dir(tmp_path / "missing", overwrite=False, resume=True)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(SettingsError, match="mutually exclusive"):
        prepare_output_dir(tmp_path, overwrite=True, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        prepare_output_dir(tmp_path / "file", overwrite=True, resume=False)
    assert (tmp_path / "file").read_text() == "x"


def test_prepare_output_dir_never_wipes_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "repo"
    work.mkdir()
    (work / "keep.py").write_text("x")
    monkeypatch.chdir(work)
    for target in (Path("."), tmp_path):
        with pytest.raises(OutputExistsError, match="refusing to --overwrite"):
            prepare_output_dir(target, overwrite=True, resume=False)
    assert (work / "keep.py").read_text() == "x"


def test_run_metadata_is_json_safe():
    meta = run_metadata()
    json.dumps(meta)
    assert meta["python"].count(".") == 2
    assert {"torch", "diffusers", "transformers", "accelerate", "sentence_transformers", "open_clip"} <= set(
        meta["packages"]
    )
    assert meta["timestamp_utc"].endswith("+00:00")
    assert meta["hostname"] and os.sep not in meta["hostname"]
