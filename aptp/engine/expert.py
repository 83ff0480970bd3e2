"""Save and load an expert: a plan replayed on the base config, plus the sliced weights.

An expert directory holds::

    plan.json           the SlicePlan (kept unit indices per module) and provenance (MACs, base model)
    config.json         the *base* (unpruned) model config the plan applies to (U-Net or transformer)
    model.safetensors   the sliced weights

``load_expert`` builds the base U-Net on the meta device (no random init, no download), replays the
plan and assigns the stored tensors; every parameter must come from the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from aptp.engine.slicing import SlicePlan, apply_plan

PLAN_FILE = "plan.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_expert(unet: nn.Module, plan: SlicePlan, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an expert directory atomically (a temp directory renamed into place).

    Args:
        unet: the sliced U-Net. Slicing never edits ``unet.config``, so it is still the base
            (unpruned) config that the plan is replayed on.
        plan: the plan that produced it.
        path: the expert directory.
        overwrite: replace an existing directory; otherwise an existing one raises FileExistsError.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"expert directory {path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
        # non-persistent buffers (a DiT's fixed position embedding) too: a meta rebuild has no values
        state.update({k: v.detach().contiguous().cpu() for k, v in _volatile_buffers(unet).items()})
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "aptp": "expert"})
        (tmp / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1))
        (tmp / CONFIG_FILE).write_text(unet.to_json_string())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _volatile_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that ``state_dict`` leaves out (registered with ``persistent=False``), by name."""
    out = {}
    for mname, mod in model.named_modules():
        for bname in getattr(mod, "_non_persistent_buffers_set", ()):
            buf = mod._buffers.get(bname)
            if buf is not None:
                out[f"{mname}.{bname}" if mname else bname] = buf
    return out


def read_plan(path: str | Path) -> SlicePlan:
    """Read an expert directory's plan.

    Raises:
        DamagedFileError: ``plan.json`` is not a readable slice plan (names the command that rebuilds it).
    """
    from aptp.rundir import damaged, read_json

    plan_path = Path(path) / PLAN_FILE
    try:
        return SlicePlan.from_dict(read_json(plan_path))
    except (KeyError, TypeError, ValueError) as exc:
        raise damaged(plan_path, exc) from None


def load_expert(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild an expert (a stock diffusers U-Net or transformer) from its directory: meta base
    model → plan → stored weights.

    Raises:
        FileNotFoundError: a file of the expert directory is missing.
        DamagedFileError: a file is unreadable, or the weights do not match the plan (missing,
            unexpected or wrongly shaped tensors); one line naming the file and the command that
            writes it again (an :class:`~aptp.errors.AptpUserError`).
    """
    from aptp.engine.backbones import backbone_for
    from aptp.rundir import damaged, read_json, read_safetensors

    path = Path(path)
    for name in (PLAN_FILE, CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an expert directory: {name} is missing")
    config = read_json(path / CONFIG_FILE)
    try:
        unet = backbone_for(config, str(path / CONFIG_FILE)).build(config, "meta")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise damaged(path / CONFIG_FILE, exc) from None
    plan = read_plan(path)
    try:
        apply_plan(unet, plan)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise damaged(path / PLAN_FILE, f"does not apply to {CONFIG_FILE}: {type(exc).__name__}: {exc}") from None
    state = read_safetensors(path / WEIGHTS_FILE, device=str(device))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    volatile = {k: state.pop(k) for k in list(state) if k in _volatile_buffers(unet)}
    for name, value in volatile.items():
        owner, _, leaf = name.rpartition(".")
        (unet.get_submodule(owner) if owner else unet)._buffers[leaf] = value
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:120]
        raise damaged(path / WEIGHTS_FILE, f"its tensors do not match {PLAN_FILE}: {first}") from None
    still_meta = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if still_meta:
        raise damaged(path / WEIGHTS_FILE, f"no weights for {', '.join(still_meta[:3])}")
    return unet.eval()
