"""From trained codes to real experts (``aptp materialize``) and prompt routing (``aptp route``)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from aptp.engine.expert import save_expert
from aptp.engine.macs import build_macs_model
from aptp.engine.slicing import slice_model
from aptp.io import atomic_write_json
from aptp.rundir import EXPERTS_DIR, RunDir

logger = logging.getLogger(__name__)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def materialize(run: RunDir, *, overwrite: bool = False, teacher=None, align: int = 1) -> list[dict[str, Any]]:
    """Binarise each code, slice the teacher's *loaded* weights into ``experts/expert-K/`` and
    write ``experts.json``.

    Args:
        run: the run directory of a finished ``aptp prune``.
        overwrite: replace existing experts (otherwise existing ones are an error).
        teacher: an already loaded :class:`~aptp.train.teacher.Teacher` (tests); loaded otherwise.
        align: round every layer's kept channels to a multiple of ``align`` without exceeding the
            code's MACs (:func:`aptp.engine.align.align_vector`, units ranked by the code's
            logits); 1 keeps the codes as they are.

    Returns:
        The per-expert records (also in ``experts.json``).
    """
    from aptp.errors import AptpUserError
    from aptp.train.teacher import load_teacher

    s = run.settings
    router = run.router()
    experts_root = run.path / EXPERTS_DIR
    if experts_root.exists() and any(experts_root.iterdir()) and not overwrite:
        raise AptpUserError(f"{experts_root} already exists; pass --overwrite to materialize again")
    teacher = teacher or load_teacher(s.model)
    space = run.space
    from aptp.models.profiles import macs_resolution

    res = macs_resolution(s, teacher.vae_scale_factor)  # the deployment resolution, not the training one
    latent = res // teacher.vae_scale_factor
    macs = build_macs_model(teacher.denoiser, space, latent, text_len=teacher.text_len)
    full_params = _params(teacher.denoiser)
    hard = router.hard_codes()  # (N, D) binary, no noise
    if align > 1:
        from aptp.engine.align import align_vector

        logits = router.codes.logits.detach().double()
        hard = torch.stack([align_vector(space, hard[k], macs, align, scores=logits[k])
                            for k in range(router.num_codes)]).to(hard.dtype)
    # share of the training prompts routed to each expert (inference routing)
    from aptp.data import build_dataset

    captions = build_dataset(s.data, seed=s.seed).captions()
    index, _ = router.route_prompts(captions) if router.num_codes > 1 else (torch.zeros(len(captions), dtype=torch.long), None)
    counts = Counter(index.tolist())
    records = []
    for k in range(router.num_codes):
        expert, plan = slice_model(teacher.denoiser, space, hard[k])
        m = float(macs(hard[k].double())[0])
        plan.meta = {"base_model": s.model.name, "expert": k, "macs": m, "macs_ratio": m / macs.full,
                     "latent_size": latent, "macs_resolution": res, "text_len": teacher.text_len,
                     "space_size": space.size}
        save_expert(expert, plan, experts_root / f"expert-{k}", overwrite=overwrite)
        kept = {kind: int(hard[k][space.kind_index(kind)].sum()) for kind in space.kinds}
        records.append({
            "expert": k, "macs": m, "macs_ratio": m / macs.full, "params": _params(expert),
            "params_ratio": _params(expert) / full_params, "units_kept": kept,
            "units_total": space.by_kind(), "share": counts.get(k, 0) / max(1, len(captions)),
            "prompts": counts.get(k, 0), "path": f"{EXPERTS_DIR}/expert-{k}",
        })
        logger.info("expert %d: MACs ratio %.3f, %d parameters", k, m / macs.full, _params(expert))
    atomic_write_json(run.experts_json, {
        "base_model": s.model.name, "resolution": res, "macs_resolution": res,
        "train_resolution": s.data.resolution, "full_macs": macs.full,
        "full_params": full_params, "encoder": router.encoder_name, "num_experts": router.num_codes,
        "align": align,
        "experts": records,
    })
    return records


def read_prompts(prompts: list[str], file: str | None) -> list[str]:
    """Prompts from arguments and/or a file (``-`` = stdin), one per line, blank lines skipped."""
    import sys

    from aptp.errors import AptpUserError

    out = list(prompts)
    if file is not None:
        if file == "-":
            text = sys.stdin.read()
        else:
            p = Path(file)
            if not p.is_file():
                raise AptpUserError(f"--prompts {file}: no such file")
            text = p.read_text()
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise AptpUserError("no prompts: pass PROMPT arguments or --prompts FILE (- for stdin)")
    return out


def route_prompts(run: RunDir, prompts: list[str], router=None,
                  ratios: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """Route prompts (inference: cosine, hard codes, no noise); one record per prompt, input order.
    ``router``: the run's router if already loaded (it is loaded otherwise); ``ratios``: each
    expert's MACs ratio if already known (read from experts.json otherwise)."""
    router = router or run.router()
    if ratios is None:
        ratios = {e["expert"]: e["macs_ratio"] for e in run.experts()} if run.experts_json.is_file() else {}
    if router.num_codes == 1:
        index, sim = torch.zeros(len(prompts), dtype=torch.long), torch.ones(len(prompts), dtype=torch.float64)
    else:
        index, sim = router.route_prompts(prompts)
    return [{"prompt": p, "expert": int(i), "macs_ratio": ratios.get(int(i)), "similarity": float(c)}
            for p, i, c in zip(prompts, index.tolist(), sim.tolist())]


def data_identity(settings) -> dict[str, Any]:
    """What decides which sample an index names: data set, root, size limit and seed (not the
    resolution, crop or flip, which change pixels but not the order of the samples)."""
    d = settings.data
    return {"name": d.name, "root": None if d.root is None else str(d.root), "max_samples": d.max_samples,
            "seed": settings.seed}


def route_dir(run: RunDir, split: str, settings=None) -> Path:
    """Where the route index of ``split`` lives for the data ``settings`` select: ``routes/<split>``
    for the run's own data, ``routes/<split>-<hash>`` when overrides (``--set data.…``,
    ``APTP_DATA__…``) select other samples, so indices never point into another data set."""
    import hashlib
    import json

    if settings is None or data_identity(settings) == data_identity(run.settings):
        return run.routes_dir(split)
    digest = hashlib.sha256(json.dumps(data_identity(settings), sort_keys=True).encode()).hexdigest()[:10]
    return run.routes_dir(split).with_name(f"{split}-{digest}")


def write_route_index(run: RunDir, split: str, *, overwrite: bool = False, settings=None) -> dict[int, int]:
    """Route every caption of a data set split and write ``<route_dir>/expert-K.json`` (the sample
    indices fine-tuning reads). ``settings`` (default: the run's) choose the data set, exactly as
    the dataset that reads the indices is built. Returns prompts per expert."""
    from aptp.data import build_dataset
    from aptp.errors import AptpUserError

    s = settings or run.settings
    ds = build_dataset(s.data, split=split, seed=s.seed)
    router = run.router()
    records = route_prompts(run, ds.captions(), router)
    out = route_dir(run, split, s)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise AptpUserError(f"{out} already exists; pass --overwrite to route again")
    by_expert: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_expert.setdefault(r["expert"], []).append(i)
    router_codes = router.num_codes
    for k in range(router_codes):
        atomic_write_json(out / f"expert-{k}.json", {"expert": k, "split": split, "data": s.data.name,
                                                     "data_identity": data_identity(s),
                                                     "indices": by_expert.get(k, [])})
    return {k: len(by_expert.get(k, [])) for k in range(router_codes)}
