"""Settings resolution: precedence, one-line error reports, run-directory round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from aptp.errors import AptpUserError, SettingsError
from aptp.settings import (
    META_FILE,
    SETTINGS_FILE,
    Settings,
    load_settings,
    resolve_settings,
    settings_to_dict,
    write_settings,
)

REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(**kwargs) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(SettingsError) as info:
        resolve_settings(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg, "the CLI prints errors as one line"
    assert isinstance(info.value, AptpUserError)
    return msg


# what the toy model (the default) sets beyond the built-in defaults: its generation resolution
TOY_MODEL_DEFAULTS = {"space": {"macs_resolution": 64}, "generate": {"height": 64, "width": 64}}


def toy_defaults() -> Settings:
    return Settings.model_validate(TOY_MODEL_DEFAULTS)


def test_defaults_without_sources():
    s = resolve_settings(env={})
    assert s == toy_defaults()
    assert s.source("prune.budget") == "default" and s.source("space.macs_resolution").startswith("model toy")


def test_a_copy_of_the_toy_dit_keeps_the_toy_schedules(tmp_path):
    """A folder holding the embedded toy DiT's architecture (a copy, a fine-tuned version) gets the
    toy's CPU schedules, not the paper's Stable-Diffusion-sized ones (which ran out of memory)."""
    import shutil

    from aptp.models import toy

    src = toy.toy_assets_dir().parent / "toy-dit"
    copy = tmp_path / "my-toy-dit"
    shutil.copytree(src, copy)
    s = resolve_settings(cli={"model.name": str(copy)}, env={})
    alias = resolve_settings(cli={"model.name": "toy-dit"}, env={})
    for key in ("data.resolution", "prune.batch_size", "prune.lr", "prune.steps", "finetune.steps",
                "space.macs_resolution"):
        section, field = key.split(".")
        assert getattr(getattr(s, section), field) == getattr(getattr(alias, section), field), key
    assert (s.data.resolution, s.prune.batch_size, s.finetune.steps) == (64, 32, 300)
    # another architecture in the same pipeline class is a real DiT: the paper's profile
    cfg_path = copy / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "num_layers": cfg["num_layers"] + 1}))
    other = resolve_settings(cli={"model.name": str(copy)}, env={})
    assert (other.data.resolution, other.finetune.steps) == (64, 30000)  # never trained above its 64 px


def test_model_dependent_defaults_follow_the_model(tmp_path):
    """Issue 12: --model sd2.1 (or an SD-shaped folder) without --resolution trains at the paper's
    256 px, counts MACs at 768 px, and gets the paper's schedules; nothing set by a source moves."""
    s = resolve_settings(cli={"model.name": "sd2.1"}, env={})
    assert (s.data.resolution, s.space.macs_resolution, s.generate.height) == (256, 768, 768)
    assert (s.prune.warmup_steps, s.prune.steps, s.prune.lr, s.prune.lr_warmup_steps) == (500, 2500, 2e-4, 100)
    assert (s.finetune.steps, s.finetune.lr, s.finetune.batch_size) == (30000, 1e-5, 128)
    assert s.prune.effective_lr(16) == pytest.approx(6.4e-3)  # x sqrt(64 x 16)
    assert s.source("data.resolution") == "model sd2.1: paper recipe (App. E)"
    assert s.source("space.macs_resolution") == "model sd2.1: generation resolution"
    given = resolve_settings(cli={"model.name": "sd2.1", "data.resolution": 512},
                             overrides=["prune.lr=1e-3"], env={"APTP_SPACE__MACS_RESOLUTION": "512"})
    assert (given.data.resolution, given.prune.lr, given.space.macs_resolution) == (512, 1e-3, 512)
    assert given.source("data.resolution") == "command line" and given.source("prune.lr") == "--set prune.lr=1e-3"
    assert given.source("space.macs_resolution") == "env APTP_SPACE__MACS_RESOLUTION"
    # a local folder: its U-Net config decides (sample_size x VAE scale factor)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 64}))
    f = resolve_settings(cli={"model.name": str(folder)}, env={})
    assert (f.space.macs_resolution, f.data.resolution, f.prune.steps) == (512, 256, 2500)


def test_settings_yaml_says_where_each_value_came_from(tmp_path):
    import yaml

    recipe = _recipe(tmp_path, "prune:\n  budget: 0.5\n")
    s = resolve_settings(recipe, cli={"model.name": "sd2.1"}, overrides=["router.num_experts=4"],
                         env={"APTP_PRUNE__STEPS": "7"})
    write_settings(s, tmp_path / "run")
    text = (tmp_path / "run" / SETTINGS_FILE).read_text()
    line, section = {}, ""
    for ln in text.splitlines():
        if ln and not ln.startswith(("#", " ")):
            section = ln.split(":")[0]
        elif ln.startswith("  "):
            line[f"{section}.{ln.split(':')[0].strip()}"] = ln
    assert line["prune.budget"].endswith(f"# recipe {recipe}")
    assert line["model.name"].endswith("# command line")
    assert line["router.num_experts"].endswith("# --set router.num_experts=4")
    assert line["prune.steps"].endswith("# env APTP_PRUNE__STEPS") and line["prune.lr_warmup_steps"].endswith("(App. E)")
    assert line["space.macs_resolution"] == "  macs_resolution: 768  # model sd2.1: generation resolution"
    assert line["space.ffn_groups"].endswith("# default")
    assert load_settings(tmp_path / "run") == s and yaml.safe_load(text) == settings_to_dict(s)


def test_recipes_by_name_and_the_paper_lr():
    from aptp.settings import shipped_recipes

    assert {"coco-base", "coco-small", "cc3m-base", "cc3m-small", "shapes"} <= set(shipped_recipes())
    by_name = resolve_settings("coco-base", env={})
    assert by_name == resolve_settings(REPO / "recipes" / "coco-base.yaml", env={})
    assert by_name.prune.lr == 2e-4 and by_name.prune.lr_scaling == "sqrt-batch"
    shapes = resolve_settings("shapes", env={})
    assert shapes.prune.effective_lr(1) == pytest.approx(1e-2)  # 1.25e-3 x sqrt(64): the toy's tuned rate
    assert shapes == toy_defaults()  # the embedded default recipe is the built-in defaults
    with pytest.raises(SettingsError, match="shipped recipe name"):
        resolve_settings("coco-bse", env={})


def test_every_field_has_default_and_description():
    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            assert not field.is_required(), f"{prefix}{name} has no default"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(Settings, "")


def test_precedence_recipe_env_cli_set(tmp_path):
    recipe = _recipe(tmp_path, "prune:\n  budget: 0.1\n")
    env = {"APTP_PRUNE__BUDGET": "0.2"}
    cli = {"prune.budget": 0.3}
    sets = ["prune.budget=0.4"]

    assert resolve_settings(recipe, env={}).prune.budget == 0.1
    assert resolve_settings(recipe, env=env).prune.budget == 0.2
    assert resolve_settings(recipe, cli=cli, env=env).prune.budget == 0.3
    assert resolve_settings(recipe, cli=cli, overrides=sets, env=env).prune.budget == 0.4


def test_layers_merge_deeply_and_none_means_flag_not_given(tmp_path):
    recipe = _recipe(tmp_path, "prune:\n  budget: 0.5\n  steps: 7\nrouter:\n  num_experts: 4\n")
    s = resolve_settings(
        recipe,
        cli={"prune.steps": None, "router.num_experts": None, "prune.lr": 0.1},
        overrides=["prune.seed=5"],
        env={"APTP_PRUNE__WARMUP_STEPS": "3"},
    )
    assert (s.prune.budget, s.prune.steps, s.prune.lr, s.prune.seed, s.prune.warmup_steps) == (
        0.5,
        7,
        0.1,
        5,
        3,
    )
    assert s.router.num_experts == 4


def test_env_values_are_parsed_as_yaml():
    s = resolve_settings(
        env={
            "APTP_SEED": "3",
            "APTP_QUIET": "true",
            "APTP_EVAL__METRICS": "[fid, pickscore]",
            "APTP_DATA__MAX_SAMPLES": "null",
            "HOME_UNRELATED": "x",
        }
    )
    assert (s.seed, s.quiet, s.eval.metrics, s.data.max_samples) == (3, True, ["fid", "pickscore"], None)


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("APTP_ROUTER__NUM_EXPERTS", "5")
    assert resolve_settings().router.num_experts == 5


def test_string_fields_keep_text_that_yaml_would_convert(tmp_path):
    s = resolve_settings(
        overrides=[
            "model.revision=20240101",
            "prune.mixed_precision=no",
            "model.name=1.0",
            'data.split="val"',
            "eval.clip_pretrained=null",
        ],
        env={},
    )
    assert (s.model.revision, s.prune.mixed_precision, s.model.name) == ("20240101", "no", "1.0")
    assert (s.data.split, s.eval.clip_pretrained) == ("val", None)
    # In a recipe, YAML 1.1 reads a bare `no` as False; it must still mean "no".
    recipe = _recipe(tmp_path, "finetune:\n  mixed_precision: no\n")
    assert resolve_settings(recipe, env={}).finetune.mixed_precision == "no"


def test_unknown_recipe_keys_all_reported_with_did_you_mean(tmp_path):
    recipe = _recipe(tmp_path, "prune:\n  budgt: 0.5\n  stepz: 3\nrouterr:\n  num_experts: 2\n")
    msg = _error(recipe=recipe)
    assert msg.startswith("settings: 3 problems: ")
    assert "prune.budgt: unknown key (did you mean 'budget'?)" in msg
    assert "prune.stepz: unknown key (did you mean 'steps'?)" in msg
    assert "routerr: unknown key (did you mean 'router'?)" in msg
    assert f"[from recipe {recipe}]" in msg


def test_key_in_wrong_section_suggests_the_right_one():
    msg = _error(overrides=["prune.num_experts=4"])
    assert "prune.num_experts: unknown key (did you mean 'router.num_experts'?) [from --set" in msg


def test_unknown_env_variable_is_reported_with_its_name():
    msg = _error(env={"APTP_PRUNE_BUDGET": "0.5", "APTP_PRUNE__BUDGT": "0.5"})
    assert msg.startswith("settings: 2 problems: ")
    assert "(did you mean 'APTP_PRUNE__BUDGET'?) [from env APTP_PRUNE_BUDGET]" in msg
    assert "prune.budgt: unknown key (did you mean 'APTP_PRUNE__BUDGET'?) [from env APTP_PRUNE__BUDGT]" in msg


def test_bad_resolution_names_value_and_rule():
    msg = _error(overrides=["data.resolution=30"])
    assert msg == (
        "settings: 1 problem: data.resolution: must be a positive multiple of 8, got 30 "
        "[from --set data.resolution=30]"
    )
    assert resolve_settings(overrides=["data.resolution=32"], env={}).data.resolution == 32


def test_problems_from_all_sources_reported_at_once(tmp_path):
    recipe = _recipe(tmp_path, "data:\n  resolution: 30\n")
    msg = _error(
        recipe=recipe,
        env={"APTP_SEED": "abc"},
        cli={"router.num_experts": 0},
        overrides=["prune.budget=1.5", "eval.metrics=[fid, fdi]"],
    )
    assert msg.startswith("settings: 5 problems: ")
    for part in (
        f"data.resolution: must be a positive multiple of 8, got 30 [from recipe {recipe}]",
        "router.num_experts: Input should be greater than or equal to 1, got 0 [from command line]",
        "prune.budget: Input should be less than or equal to 1, got 1.5 [from --set prune.budget=1.5]",
        "eval.metrics[1]: Input should be 'fid', 'clip', 'cmmd' or 'pickscore', got 'fdi'",
        "seed: Input should be a valid integer",
    ):
        assert part in msg


@pytest.mark.parametrize("budget", ["0", "-0.1", "1.01"])
def test_budget_bounds(budget):
    assert "prune.budget" in _error(overrides=[f"prune.budget={budget}"])


@pytest.mark.parametrize("item", ["prune.budget", "=0.5", ""])
def test_malformed_set(item):
    msg = _error(overrides=[item])
    assert msg.startswith(f"--set {item!r}: expected KEY=VALUE")


def test_missing_recipe(tmp_path):
    msg = _error(recipe=tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in msg and "not found" in msg


def test_unparsable_recipe(tmp_path):
    recipe = _recipe(tmp_path, "prune:\n  budget: [0.5\n")
    msg = _error(recipe=recipe)
    assert msg.startswith(f"recipe {recipe}: invalid YAML at line")


def test_recipe_top_level_must_be_mapping(tmp_path):
    msg = _error(recipe=_recipe(tmp_path, "- prune\n- budget\n"))
    assert "top level must be a mapping" in msg and "got list" in msg


def test_empty_recipe_means_defaults(tmp_path):
    assert resolve_settings(_recipe(tmp_path, "# nothing yet\n"), env={}) == toy_defaults()


def test_settings_round_trip(tmp_path):
    s = resolve_settings(
        overrides=[
            "output=" + str(tmp_path / "run"),
            "data.root=" + str(tmp_path / "data"),
            "prune.lr=3.3e-5",
            "finetune.ema_decay=0.99991",
            "prune.mixed_precision=no",
            "model.revision=0123",
            "eval.metrics=[pickscore]",
            "generate.height=512",
            "log_format=json",
        ],
        env={},
    )
    write_settings(s, tmp_path / "run")
    assert load_settings(tmp_path / "run") == s
    assert load_settings(tmp_path / "run" / SETTINGS_FILE) == s
    # settings.yaml is itself a valid recipe
    assert resolve_settings(tmp_path / "run" / SETTINGS_FILE, env={}) == s
    meta = json.loads((tmp_path / "run" / META_FILE).read_text())
    assert {"python", "platform", "hostname", "timestamp_utc", "packages"} <= meta.keys()


def test_settings_to_dict_is_json_safe(tmp_path):
    s = resolve_settings(overrides=[f"data.root={tmp_path}"], env={})
    d = settings_to_dict(s)
    assert d["data"]["root"] == str(tmp_path)
    json.dumps(d)


def test_load_settings_errors(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path)
    (tmp_path / SETTINGS_FILE).write_text("prune:\n  budgt: 0.5\n")
    with pytest.raises(SettingsError, match=r"prune.budgt: unknown key .*\[from .*settings.yaml\]"):
        load_settings(tmp_path)


# The toy model's training recipes have their own schema (aptp.train.toy.ToyTrainSettings) and are
# validated in test_toy.py (and test_toy_dit_train.py).
_TRAINING_RECIPES = {"toy-vae.yaml", "toy-teacher.yaml", "toy-clip.yaml", "toy-dit-teacher.yaml"}  # toy-dit: test_toy_dit_train.py


@pytest.mark.parametrize("recipe", sorted(p for p in (REPO / "recipes").glob("*.yaml") if p.name not in _TRAINING_RECIPES),
                         ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    resolve_settings(recipe, env={})


def test_guidance_defaults_to_the_models_recommended_scale(tmp_path):
    from types import SimpleNamespace

    from aptp.generate import ExpertPipeline
    from aptp.models.registry import default_guidance
    from aptp.settings import GenerateSettings

    assert GenerateSettings().guidance is None
    assert default_guidance("toy") == 3.0 and default_guidance("sd2.1") == 7.5
    assert default_guidance(str(tmp_path)) == 7.5 and default_guidance(None) == 7.5  # folders, hub ids: 7.5
    from tests.conftest import make_tiny_unet

    pipe = SimpleNamespace(unet=make_tiny_unet(randomize=False), tokenizer=SimpleNamespace(model_max_length=77))
    assert ExpertPipeline(None, pipe, model="toy").guidance(GenerateSettings()) == 3.0
    assert ExpertPipeline(None, pipe, model="sd2.1").guidance(GenerateSettings()) == 7.5
    assert ExpertPipeline(None, pipe, model="toy").guidance(GenerateSettings(guidance=7.5)) == 7.5  # given wins
    shapes = resolve_settings(REPO / "recipes" / "shapes.yaml", env={})
    assert shapes.model.name == "toy" and shapes.generate.guidance is None
    assert resolve_settings(REPO / "recipes" / "coco-base.yaml", env={}).generate.guidance == 7.5


def test_eval_targets_at_weights_and_folders_named_so(tmp_path):
    from aptp.evaluate import classify, run_path

    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.yaml").write_text("{}\n")
    t = classify(f"{run}@initial")
    assert (t.kind, t.path, t.weights) == ("run", str(run), "initial") and run_path(f"{run}@finetuned") == run
    images = tmp_path / "gen@initial"  # an existing folder whose name only looks like RUN@weights
    images.mkdir()
    (images / "manifest.jsonl").write_text("")
    assert classify(str(images)).kind == "images" and run_path(str(images)) is None
    with pytest.raises(AptpUserError, match="not a run directory"):
        classify(f"{tmp_path / 'missing'}@initial")
