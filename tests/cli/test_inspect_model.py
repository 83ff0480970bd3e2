"""`aptp inspect-model` and the CLI's bad-input contract (one line, exit code 2)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from aptp.cli.main import app
from tests.conftest import make_tiny_unet

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"HF_HUB_OFFLINE": "1"})


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "inspect-model" in result.stdout


@pytest.mark.parametrize("resolution,gmacs", [(768, 1074.6), (512, 402.1)])
def test_sd21_json_offline(resolution, gmacs):
    result = invoke("inspect-model", "--model", "sd2.1", "--resolution", str(resolution), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "sd2.1" and report["resolution"] == resolution
    assert report["params"] == 865_910_724
    assert report["units"]["total"] == 1620
    assert report["units"]["by_kind"] == {"resnet_channels": 704, "self_attn_heads": 195,
                                          "cross_attn_heads": 195, "ffn_channels": 512, "depth": 14}
    assert abs(report["gmacs"] - gmacs) / gmacs < 0.005
    assert report["gmacs_conv_linear"] < report["gmacs"]
    assert abs(sum(b["gmacs"] for b in report["blocks"]) - report["gmacs"]) < 1e-6


def test_table_and_vector_on_local_folder(tmp_path):
    folder = tmp_path / "tiny-unet"
    make_tiny_unet().save_pretrained(folder)
    res = invoke("inspect-model", "--model", str(folder), "--resolution", "64", "--format", "json",
                 "--set", "space.ffn_groups=8")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)["units"]["total"]
    vec = torch.ones(d)
    vec[:100] = 0
    (tmp_path / "v.json").write_text(json.dumps(vec.tolist()))
    res = invoke("inspect-model", "--model", str(folder), "--resolution", "64", "--vector", str(tmp_path / "v.json"),
                 "--format", "json", "--set", "space.ffn_groups=8")
    assert res.exit_code == 0, res.output
    v = json.loads(res.stdout)["vector"]
    assert v["kept_total"] == d - 100 and 0 < v["macs_ratio"] < 1
    assert abs(v["gmacs"] - v["gmacs_counted"]) <= 0.005 * v["gmacs_counted"]
    table = invoke("inspect-model", "--model", str(folder), "--resolution", "64", "--set", "space.ffn_groups=8",
                   "--vector", str(tmp_path / "v.json"))
    assert table.exit_code == 0 and "total" in table.stdout and "vector:" in table.stdout


def test_unknown_alias():
    assert_one_line_error(invoke("inspect-model", "--model", "sd9.9"), "sd9.9", "sd2.1")


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    assert_one_line_error(invoke("inspect-model", "--model", str(tmp_path / "junk")), "not a diffusers folder")


def test_resolution_not_multiple_of_8():
    assert_one_line_error(invoke("inspect-model", "--model", "sd2.1", "--resolution", "770"), "770", "multiple of 8")


def test_vector_of_wrong_length(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps([1.0] * 1619))
    assert_one_line_error(invoke("inspect-model", "--model", "sd2.1", "--vector", str(tmp_path / "v.json")),
                          "1619", "1620")


def test_unknown_setting_key():
    assert_one_line_error(invoke("inspect-model", "--model", "sd2.1", "--set", "space.ffn_grups=8"), "ffn_groups")


def test_missing_weights_message_is_one_line():
    """Architecture work is offline; loading real weights without a local copy says how to get them."""
    from aptp.errors import ModelNotFoundError
    from aptp.models.registry import load_unet, resolve_model

    with pytest.raises(ModelNotFoundError) as info:
        load_unet(resolve_model("sd2.1"), local_only=True)
    msg = str(info.value)
    assert "\n" not in msg and "hf download stabilityai/stable-diffusion-2-1" in msg and "--model" in msg


def test_save_space_writes_json_and_never_overwrites(tmp_path):
    target = tmp_path / "arch_space.json"
    res = invoke("inspect-model", "--model", "sd2.1", "--format", "json", "--save-space", str(target))
    assert res.exit_code == 0, res.output
    saved = json.loads(target.read_text())
    assert saved["size"] == 1620 and len(saved["segments"]) > 0 and saved["meta"]["model"] == "sd2.1"
    before = target.read_bytes()
    assert_one_line_error(invoke("inspect-model", "--model", "sd2.1", "--save-space", str(target)), "exists")
    assert target.read_bytes() == before


@pytest.mark.parametrize("alias,resolution,params,units,gmacs", [
    ("sd1.5", 512, 859_520_964, 1486, 401.64),
    ("sdxl", 1024, 2_567_463_684, 5464, 3380.62),
])
def test_sd15_and_sdxl_json_offline(alias, resolution, params, units, gmacs):
    from aptp.engine.macs import count_macs
    from aptp.models.registry import build_unet, resolve_model

    result = invoke("inspect-model", "--model", alias, "--resolution", str(resolution), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params"] == params and report["units"]["total"] == units
    counted = count_macs(build_unet(resolve_model(alias)), resolution // 8) / 1e9  # FlopCounterMode, meta
    assert abs(report["gmacs"] - counted) / counted < 0.005
    assert abs(report["gmacs"] - gmacs) < 0.01
    default = json.loads(invoke("inspect-model", "--model", alias, "--format", "json").stdout)
    assert default["resolution"] == resolution


@pytest.mark.parametrize("change,needle", [
    ({"down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
     "down block type 'AttnDownBlock2D' is not supported"),
    ({"in_channels": 9}, "in_channels=9 != out_channels=4"),
    ({"class_embed_type": "timestep"}, "class conditioning"),
    ({"_class_name": "UNet2DModel"}, "a UNet2DModel is not supported"),
])
def test_unsupported_unet_folder_is_one_line(tmp_path, change, needle):
    from tests.conftest import TINY_UNET

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET, **change}))
    assert_one_line_error(invoke("inspect-model", "--model", str(folder)), str(folder), needle)


def test_pipeline_folder_without_unet_is_one_line(tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    (tmp_path / "pipe" / "unet").mkdir()
    assert_one_line_error(invoke("inspect-model", "--model", str(tmp_path / "pipe")), "PixArtAlphaPipeline")
