"""One settings tree shared by every command, and the single place it is resolved.

Sources, lowest to highest precedence::

    defaults < recipe YAML < environment (APTP_<SECTION>__<FIELD>) < CLI flags < --set key=value

All sources are merged into one plain nested dict that is validated once, so every
problem (typos in several files, bad values) is reported together, in one line, as a
:class:`~aptp.errors.SettingsError`.

Example::

    s = resolve_settings(Path("recipes/toy.yaml"), cli={"prune.budget": 0.5},
                         overrides=["router.num_experts=4"])
    write_settings(s, run_dir)          # run_dir/settings.yaml + run_dir/run-meta.json
    assert load_settings(run_dir) == s
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from aptp.errors import SettingsError
from aptp.io import atomic_write_json, atomic_write_text, run_metadata

__all__ = [
    "ENV_PREFIX",
    "META_FILE",
    "SETTINGS_FILE",
    "DataSettings",
    "EvalSettings",
    "FinetuneSettings",
    "GenerateSettings",
    "ModelSettings",
    "PruneSettings",
    "RouterSettings",
    "Settings",
    "SpaceSettings",
    "load_settings",
    "resolve_settings",
    "settings_to_dict",
    "write_settings",
]

ENV_PREFIX = "APTP_"
SETTINGS_FILE = "settings.yaml"
META_FILE = "run-meta.json"


# --------------------------------------------------------------------------- field types


def _no_from_yaml(value: Any) -> Any:
    # YAML 1.1 reads a bare `no` as False; `mixed_precision: no` must still mean "no".
    return "no" if value is False else value


MixedPrecision = Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(_no_from_yaml)]
# `~/data` in a recipe or --set is not expanded by a shell.
UserPath = Annotated[Path, AfterValidator(lambda p: p.expanduser())]


def _multiple_of_8(value: int | None) -> int | None:
    if value is not None and (value <= 0 or value % 8):
        raise ValueError(f"must be a positive multiple of 8, got {value}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- sections


class ModelSettings(_Section):
    """Which diffusion model to prune / fine-tune / sample from."""

    name: str = Field("toy", description="Model alias (toy, sd2.1), local diffusers folder, or hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); None = default.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Dtype the model weights are loaded in."
    )
    local_files_only: bool = Field(
        False, description="Never download; use local folders and the HF cache only."
    )


class SpaceSettings(_Section):
    """The architecture space: which units of the U-Net can be pruned."""

    ffn_groups: int = Field(
        32, ge=1, description="Feed-forward hidden channels are pruned in this many groups."
    )
    depth_policy: Literal["paper", "none"] = Field(
        "paper", description="'paper': blocks that may be skipped as in APTP; 'none': width pruning only."
    )
    macs_resolution: int | None = Field(
        None,
        description="Image size (px) at which MACs are counted for the budget, experts.json, eval and reports: "
        "the deployment resolution, independent of the training resolution; None = the model's generation "
        "resolution (SD 2.1: 768, SD 1.5: 512, SDXL: 1024, toy: 64).",
    )

    _check_macs_resolution = field_validator("macs_resolution")(_multiple_of_8)


class DataSettings(_Section):
    """Training / evaluation images and captions."""

    name: str = Field(
        "shapes", description="shapes | coco | cc3m | path to an image folder with metadata.jsonl."
    )
    root: UserPath | None = Field(None, description="Data set root folder; None = the data set's default.")
    resolution: int = Field(64, description="Training image size in pixels (positive multiple of 8).")
    center_crop: bool = Field(True, description="Center-crop (else random-crop) to the resolution.")
    random_flip: bool = Field(False, description="Randomly flip images horizontally.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many samples; None = all.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = main process).")
    split: str = Field("train", description="Data set split to read.")

    _check_resolution = field_validator("resolution")(_multiple_of_8)


class RouterSettings(_Section):
    """The prompt router: prompt encoder, architecture predictor and its losses."""

    prompt_encoder: str = Field(
        "all-MiniLM-L6-v2", description="sentence-transformers model embedding the prompts."
    )
    num_experts: int = Field(8, ge=1, description="Number of architecture codes (experts).")
    gumbel_temperature: float = Field(0.4, gt=0, description="Gumbel-Sigmoid temperature of the gates.")
    sinkhorn_epsilon: float = Field(0.05, gt=0, description="Entropic regularisation of Sinkhorn OT.")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn iterations per batch.")
    contrastive_temperature: float = Field(0.03, gt=0, description="Temperature of the contrastive loss.")
    assignment_temperature: float = Field(
        0.1, gt=0, description="Softmax temperature of the assignment-consistency loss (not in the paper; SwAV's 0.1)."
    )
    embedding_cache: UserPath | None = Field(
        None, description="Directory caching prompt embeddings per encoder; None = ~/.cache/aptp/embeddings."
    )


class PruneSettings(_Section):
    """`aptp prune`: train the router and gates under a MACs budget."""

    budget: float = Field(
        0.78, gt=0, le=1, description="Target MACs as a fraction of the base model (0 < b <= 1)."
    )
    method: Literal["aptp", "uni-arch", "weight-norm"] = Field(
        "aptp",
        description="'aptp': prompt-routed experts; 'uni-arch': one learned architecture for all prompts; "
        "'weight-norm': one static architecture by L1 weight norms (Li et al. 2017), no training.",
    )
    optimal_transport: bool = Field(True, description="Balance prompts over codes with Sinkhorn OT.")
    distill: bool = Field(True, description="Distill from the unpruned teacher while pruning.")
    warmup_steps: int = Field(
        100, ge=0, description="Router warm-up steps before codes are used (paper: 500, see recipes/)."
    )
    steps: int = Field(400, ge=0, description="Pruning steps after warm-up, with codes (paper: 2500).")
    lr: float = Field(
        1.25e-3, ge=0,
        description="Base AdamW learning rate; with lr_scaling 'sqrt-batch' the rate used is lr x sqrt(global "
        "batch) (paper: 2e-4 -> 6.4e-3 at its batch 1,024; embedded default: 1.25e-3 -> 1e-2 at batch 64).",
    )
    lr_scaling: Literal["sqrt-batch", "none"] = Field(
        "sqrt-batch",
        description="'sqrt-batch': multiply lr by sqrt(batch_size x processes x grad_accum), as the official APTP "
        "code does (the printed 2e-4 alone cannot move a code logit from +3 to 0 in 3,000 steps); 'none': lr as is.",
    )
    lr_warmup_steps: int = Field(20, ge=0, description="Linear learning-rate warm-up steps (paper: 100).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(64, ge=1, description="Batch size per process.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lambda_distill: float = Field(0.2, ge=0, description="Weight of the distillation loss.")
    lambda_res: float = Field(2.0, ge=0, description="Weight of the resource (MACs) loss.")
    lambda_cont: float = Field(100.0, ge=0, description="Weight of the contrastive loss.")
    resource_on: Literal["hard", "relaxed"] = Field(
        "hard",
        description="MACs the resource loss constrains: 'hard' = the noise-free binary architectures "
        "(1[logit >= 0], straight-through) that materialize slices, so the experts meet the budget; "
        "'relaxed' = the sampled Gumbel-sigmoid gates, whose expected MACs sit below the hard ones.",
    )
    lambda_assign: float = Field(
        1.0, ge=0,
        description="Weight of the assignment-consistency loss that makes inference routing (nearest code) "
        "follow the training assignment (optimal transport); not in the paper, 0 = the paper's objective.",
    )
    checkpoint_every: int = Field(100, ge=1, description="Save a checkpoint every this many steps.")
    keep_checkpoints: int = Field(3, ge=0, description="Keep this many most recent checkpoints.")
    log_every: int = Field(10, ge=1, description="Log metrics every this many steps.")
    mixed_precision: MixedPrecision = Field("no", description="Autocast the U-Net: no | fp16 | bf16.")
    seed: int = Field(0, description="Seed of the pruning run.")

    def effective_lr(self, processes: int = 1) -> float:
        """The AdamW rate used: ``lr``, times sqrt(global batch) under ``lr_scaling: sqrt-batch``."""
        if self.lr_scaling == "none":
            return self.lr
        return self.lr * math.sqrt(self.batch_size * processes * self.grad_accum)


class FinetuneSettings(_Section):
    """`aptp finetune`: fine-tune the pruned experts."""

    steps: int = Field(300, ge=0, description="Fine-tuning steps per expert (paper: 30000, see recipes/).")
    lr: float = Field(5e-5, ge=0, description="Learning rate (paper: 1e-5).")
    batch_size: int = Field(32, ge=1, description="Batch size per process (paper: 128).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    alpha_ddpm: float = Field(1e-4, ge=0, description="Weight of the denoising (DDPM) loss.")
    alpha_distill: float = Field(1.0, ge=0, description="Weight of the distillation loss.")
    ema: bool = Field(False, description="Keep an exponential moving average of the weights.")
    ema_decay: float = Field(0.9999, ge=0, le=1, description="EMA decay.")
    checkpoint_every: int = Field(100, ge=1, description="Save a checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=0, description="Keep this many most recent checkpoints.")
    log_every: int = Field(10, ge=1, description="Log metrics every this many steps.")
    mixed_precision: MixedPrecision = Field("no", description="accelerate mixed precision: no | fp16 | bf16.")
    seed: int = Field(0, description="Seed of the fine-tuning run.")


class GenerateSettings(_Section):
    """`aptp generate`: sampling."""

    scheduler: Literal["pndm", "ddim"] = Field("pndm", description="Sampling scheduler.")
    steps: int = Field(25, ge=1, description="Denoising steps.")
    guidance: float | None = Field(
        None, ge=0,
        description="Classifier-free guidance scale (1 = off); None = the model's recommended scale "
        "(7.5, the paper's, for SD 2.1 and unknown models; 3 for the embedded toy).",
    )
    height: int | None = Field(None, description="Image height (multiple of 8); None = model default.")
    width: int | None = Field(None, description="Image width (multiple of 8); None = model default.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass.")
    seed: int = Field(0, description="Sampling seed.")

    _check_size = field_validator("height", "width")(_multiple_of_8)


class EvalSettings(_Section):
    """`aptp eval`: image quality metrics."""

    metrics: list[Literal["fid", "clip", "cmmd", "pickscore"]] = Field(
        default_factory=lambda: ["fid", "clip", "cmmd"], description="Metrics to compute."
    )
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many prompts; None = all.")
    clip_model: str = Field(
        "auto",
        description="CLIP network for CLIP score and CMMD: auto (domain-clip on shapes, else ViT-B-32), "
        "domain-clip[:FOLDER], an open_clip name (ViT-B-32) or local-dir:FOLDER.",
    )
    clip_pretrained: str | None = Field(None, description="open_clip weights: a file or a tag; None = openai.")
    fid_features: str | None = Field(
        None,
        description="FID feature network: None = auto (domain-clip on shapes, else inception), inception, "
        "a .pth Inception file, domain-clip[:FOLDER], clip (the CLIP network) or an open_clip folder.",
    )
    pickscore_model: str | None = Field(None, description="Folder of the PickScore_v1 CLIPModel (local).")
    cmmd_estimator: Literal["unbiased", "biased"] = Field(
        "unbiased", description="MMD² estimator of CMMD (the reference code uses biased)."
    )
    split: str = Field("validation", description="Data split whose captions and images are the reference.")
    resolution: int = Field(256, ge=1, description="Images are resized to this size before scoring.")


class Settings(BaseModel):
    """All settings of every command. Sections are documented on their classes."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings, description="Model to load.")
    space: SpaceSettings = Field(default_factory=SpaceSettings, description="Architecture space.")
    data: DataSettings = Field(default_factory=DataSettings, description="Data set.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="Prompt router.")
    prune: PruneSettings = Field(default_factory=PruneSettings, description="`aptp prune`.")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings, description="`aptp finetune`.")
    generate: GenerateSettings = Field(default_factory=GenerateSettings, description="`aptp generate`.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="`aptp eval`.")
    output: UserPath | None = Field(None, description="Run / output directory.")
    seed: int = Field(0, description="Seed for work not covered by a section seed.")
    quiet: bool = Field(False, description="No progress bars; warnings and errors only.")
    log_format: Literal["text", "json"] = Field("text", description="Console log format.")

    # dotted key -> where its value came from (recipe, env, flag, --set, model default); not a setting
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:  # settings are equal when their values are
        if not isinstance(other, Settings):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def source(self, key: str) -> str:
        """Where the setting ``key`` (dotted) came from: a recipe, env, flag, ``--set``, a model
        default (``model sd2.1: ...``) or ``default`` (the built-in, embedded-world default)."""
        return " ".join(self._sources.get(key, "default").split())


# --------------------------------------------------------------------------- merging

_Key = tuple[str, ...]
_NULLS = {"", "~", "null", "Null", "NULL", "None", "none"}


class _Layers:
    """A nested plain dict built from sources in precedence order, remembering who set what."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}
        self.origin: dict[_Key, str] = {}

    def apply(self, key: _Key, value: Any, source: str) -> None:
        if isinstance(value, Mapping):
            # Deep merge: a mapping adds to what lower layers set instead of replacing it.
            self._node(key)
            for k, v in value.items():
                self.apply((*key, str(k)), v, source)
            return
        node = self._node(key[:-1])
        node[key[-1]] = value
        self.origin = {k: s for k, s in self.origin.items() if k[: len(key)] != key}
        self.origin[key] = source

    def _node(self, key: _Key) -> dict[str, Any]:
        node = self.tree
        for part in key:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        return node

    def source_of(self, loc: _Key) -> str | None:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.origin:
                return self.origin[loc[:n]]
        return None


def _section_model(key: _Key) -> type[BaseModel] | None:
    """The pydantic model holding the field ``key[-1]``, or None if ``key[:-1]`` is unknown."""
    model: type[BaseModel] = Settings
    for part in key[:-1]:
        field = model.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _field_kind(key: _Key) -> tuple[bool, bool]:
    """(is_string_like, is_nullable) of the field at ``key``; (False, False) if unknown."""
    model = _section_model(key)
    field = model.model_fields.get(key[-1]) if model is not None else None
    if field is None:
        return False, False
    tp = _unwrap(field.annotation)
    args = [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [_unwrap(a) for a in typing.get_args(tp)]
    nullable = type(None) in args
    args = [a for a in args if a is not type(None)]

    def stringy(a: Any) -> bool:
        if typing.get_origin(a) is Literal:
            return all(isinstance(v, str) for v in typing.get_args(a))
        return isinstance(a, type) and issubclass(a, (str, Path))

    return bool(args) and all(stringy(a) for a in args), nullable


def _parse_value(key: _Key, raw: str) -> Any:
    """Parse an env / --set string: YAML for numbers, bools and lists; kept as text for strings.

    For string-typed fields the text is kept verbatim, so ``revision=20240101`` stays a
    string and ``mixed_precision=no`` is not turned into ``False`` by YAML 1.1.
    """
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # let validation report it against the field's type
    stringy, nullable = _field_kind(key)
    if nullable and raw.strip() in _NULLS:
        return None
    if stringy and not isinstance(parsed, str):
        return raw
    return parsed


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with aptp (``aptp/recipes/*.yaml``), by name (``coco-base``)."""
    from importlib import resources

    root = Path(str(resources.files("aptp") / "recipes"))
    return {p.stem: p for p in sorted(root.glob("*.yaml")) if not p.stem.startswith("toy-")}  # toy-*: python -m aptp.train.toy


def find_recipe(recipe: str | os.PathLike[str]) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (``coco-base``, ``shapes``)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = str(recipe).removesuffix(".yaml")
    if name in shipped and not path.parent.parts:
        return shipped[name]
    what = "is a directory" if path.is_dir() else "not found"
    raise SettingsError(f"recipe {path}: {what}; pass the path of a recipe YAML file or a shipped recipe "
                        f"name ({', '.join(shipped)})")


def _read_recipe(recipe: Path) -> dict[str, Any]:
    return _load_yaml_mapping(find_recipe(recipe), "recipe")


def _load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingsError(f"{what} {path}: invalid YAML{where}: {problem}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{what} {path}: cannot read: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"{what} {path}: top level must be a mapping of sections (e.g. 'prune:'), "
            f"got {type(data).__name__}"
        )
    return data


def _env_key(name: str) -> _Key:
    return tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))


def _split_override(item: str) -> tuple[_Key, str]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingsError(
            f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set prune.budget=0.5"
        )
    return tuple(key.split(".")), raw


def resolve_settings(
    recipe: Path | None = None,
    cli: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge every settings source and validate once. The one entry point of the CLI.

    Args:
        recipe: YAML file with the same nesting as :class:`Settings` (lowest precedence).
        cli: Dotted key → value from CLI flags, e.g. ``{"prune.budget": 0.5}``. ``None``
            values mean "flag not given" and are skipped.
        overrides: ``--set`` strings ``dotted.key=value`` (highest precedence); values are
            parsed as YAML, except for string fields, which keep the text as given.
        env: Environment to read ``APTP_<SECTION>__<FIELD>`` / ``APTP_<FIELD>`` from
            (values parsed like ``--set``); defaults to ``os.environ``. Every ``APTP_*``
            variable must name a setting.

    Returns:
        The validated settings.

    Raises:
        SettingsError: One line listing every problem, e.g. ``settings: 2 problems:
            prune.budgt: unknown key (did you mean 'budget'?) [from recipe r.yaml];
            data.resolution: must be a positive multiple of 8, got 30 [from --set]``.
    """
    layers = _Layers()
    if recipe is not None:
        layers.apply((), _read_recipe(recipe), f"recipe {recipe}")
    environ = os.environ if env is None else env
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = _env_key(name)
            layers.apply(key, _parse_value(key, environ[name]), f"env {name}")
    for dotted, value in (cli or {}).items():
        if value is not None:
            layers.apply(tuple(dotted.split(".")), value, "command line")
    for item in overrides:
        key, raw = _split_override(item)
        layers.apply(key, _parse_value(key, raw), f"--set {item}")
    _apply_model_defaults(layers)
    return _validate(layers)


def _apply_model_defaults(layers: _Layers) -> None:
    """Fill every model-dependent setting that no source set from the model's profile
    (:func:`aptp.models.profiles.model_defaults`), recording the reason as its source."""
    model = layers.tree.get("model")
    name = model.get("name", "toy") if isinstance(model, dict) else "toy"
    if not isinstance(name, str):
        return  # validation reports it
    from aptp.models.profiles import model_defaults

    for dotted, (value, why) in model_defaults(name).items():
        key = tuple(dotted.split("."))
        if layers.source_of(key) is None:
            layers.apply(key, value, why)


def _leaf_keys() -> list[_Key]:
    keys: list[_Key] = []
    for name, field in Settings.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += [(name, f) for f in sub.model_fields]
        else:
            keys.append((name,))
    return keys


def _validate(layers: _Layers) -> Settings:
    try:
        settings = Settings.model_validate(layers.tree)
    except ValidationError as exc:
        raise SettingsError(_format_errors(exc, layers)) from exc
    for key in _leaf_keys():
        source = layers.source_of(key)
        if source is not None:
            settings._sources[".".join(key)] = source
    return settings


# --------------------------------------------------------------------------- error messages


def _suggest(key: _Key) -> str | None:
    """A dotted suggestion for an unknown key: a close name in the same section, or the
    same name in another section (``prune.num_experts`` → ``router.num_experts``)."""
    name = key[-1]
    candidates: list[str] = []
    for section, field in Settings.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            candidates += [f"{section}.{f}" for f in sub.model_fields]
    flat = "_".join(key)  # e.g. APTP_PRUNE_BUDGET (one underscore) -> prune_budget
    for cand in candidates:
        if cand.replace(".", "_") == flat:
            return cand
    model = _section_model(key)
    if model is not None:
        close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.6)
        if close:
            return ".".join((*key[:-1], close[0]))
    for cand in candidates:  # same field name, wrong section
        if cand.split(".")[-1] == name and cand != ".".join(key):
            return cand
    return None


def _loc_str(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "settings"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_errors(exc: ValidationError, layers: _Layers) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = tuple(str(p) for p in loc if not isinstance(p, int))
        source = layers.source_of(key)
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
            hint = _suggest(key)
            if hint is not None:
                if source and source.startswith("env "):
                    hint = ENV_PREFIX + hint.upper().replace(".", "__")
                elif hint.rpartition(".")[0] == ".".join(key[:-1]):
                    hint = hint.rpartition(".")[2]  # same section: the bare field name
                msg += f" (did you mean '{hint}'?)"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"expected a mapping of settings, got {_short(err['input'])}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if kind != "value_error":
                msg += f", got {_short(err['input'])}"
        problem = f"{_loc_str(loc)}: {msg}"
        if source:
            problem += f" [from {source}]"
        problems.append(problem)
    n = len(problems)
    return f"settings: {n} problem{'s' if n != 1 else ''}: " + "; ".join(problems)


# --------------------------------------------------------------------------- run directory


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """Plain JSON/YAML-safe dict of ``settings`` (Paths as str), in field order."""
    return settings.model_dump(mode="json")


def write_settings(settings: Settings, directory: str | os.PathLike[str]) -> Path:
    """Atomically write ``settings.yaml`` and ``run-meta.json`` into ``directory``.

    ``settings.yaml`` holds only the resolved settings (it is a valid recipe);
    ``run-meta.json`` holds :func:`aptp.io.run_metadata` (versions, host, time).

    Returns:
        Path of the written ``settings.yaml``.
    """
    directory = Path(directory)
    path = atomic_write_text(directory / SETTINGS_FILE, settings_yaml(settings))
    atomic_write_json(directory / META_FILE, run_metadata())
    return path


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def settings_yaml(settings: Settings) -> str:
    """The resolved settings as a YAML recipe, each value followed by where it came from
    (``# default``, ``# recipe …``, ``# env APTP_…``, ``# command line``, ``# --set …``,
    ``# model sd2.1: …``). ``yaml.safe_load`` of the text gives :func:`settings_to_dict`."""
    data = settings_to_dict(settings)
    lines = ["# aptp resolved settings: a valid recipe; the comment after each value says where it came from"]
    for name, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{name}:")
            for field, v in value.items():
                lines.append(f"  {field}: {_flow(v)}  # {settings.source(f'{name}.{field}')}")
        else:
            lines.append(f"{name}: {_flow(value)}  # {settings.source(name)}")
    return "\n".join(lines) + "\n"


def load_settings(directory: str | os.PathLike[str]) -> Settings:
    """Read back the settings written by :func:`write_settings`.

    Args:
        directory: A run directory, or a ``settings.yaml`` file itself.

    Raises:
        SettingsError: Missing file, invalid YAML or settings that no longer validate.
    """
    path = Path(directory).expanduser()
    if path.is_dir():
        path = path / SETTINGS_FILE
    if not path.is_file():
        raise SettingsError(f"{path} not found; is {path.parent} an aptp run directory?")
    layers = _Layers()
    layers.apply((), _load_yaml_mapping(path, "settings file"), str(path))
    return _validate(layers)
