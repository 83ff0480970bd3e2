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
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from aptp.errors import SettingsError
from aptp.io import atomic_write_json, atomic_write_text, run_metadata
from aptp.settings_schema import (
    DataSettings,
    EvalSettings,
    FinetuneSettings,
    GenerateSettings,
    ModelSettings,
    PruneSettings,
    RouterSettings,
    Settings,
    SpaceSettings,
)

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
