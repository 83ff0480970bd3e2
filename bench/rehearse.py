"""Full-size rehearsal of the real path, offline: a Stable Diffusion 2.1-topology pipeline with
random weights, a tiny COCO-2014-schema folder, then the CLI chain as separate processes::

    aptp prune --model FOLDER --recipe recipes/coco-base.yaml ...   (a few steps, 256 px)
    aptp materialize RUN
    aptp finetune RUN --expert 0 --steps 2
    aptp generate RUN "..." (1 image, 2 steps)
    aptp eval RUN --limit 2 (domain-CLIP features: no CLIP / Inception weights can be downloaded here)

Each command's wall time and peak resident memory (``ru_maxrss`` of the finished process from
``os.wait4``: the largest of the process and the children it waited for) are printed as a
markdown table and written as JSON. Usage::

    python bench/rehearse.py --tiny                   # a tiny config of the same topology (quick check)
    python bench/rehearse.py                          # full size: ~5 GB on disk, ~8 GB RAM, minutes
    python bench/rehearse.py --family sdxl            # a small random SDXL pipeline (two text encoders)

The pipeline folder is built once under ``--workdir`` (``models/<family>[-tiny]``) and reused
while its description matches; the data and run directories are deleted at the end unless
``--keep``. Nothing is downloaded: the tokenizer is the real CLIP BPE tokenizer, rebuilt from
open_clip's shipped ``bpe_simple_vocab_16e6.txt.gz``; the prompt encoder is the installed
all-MiniLM-L6-v2 (the recipe's all-mpnet-base-v2 is not installed here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION_FILE = "rehearsal-model.json"
PROMPT = "a red double decker bus driving down a city street"

# Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1): OpenCLIP ViT-H/14 text tower as a
# transformers CLIPTextModel, and the SD AutoencoderKL.
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                 layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", scaling_factor=0.18215)
# SD 2.1 ships a DDIM config with the PNDM keys as well (skip_prk_steps): aptp builds PNDM or DDIM from it.
SD21_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      num_train_timesteps=1000, prediction_type="v_prediction", set_alpha_to_one=False,
                      skip_prk_steps=True, steps_offset=1, trained_betas=None)
# SDXL base samples with Euler (epsilon prediction); aptp builds PNDM / DDIM from that config.
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      use_karras_sigmas=False)

TINY_TEXT = dict(SD21_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=32)
TINY_VAE = dict(SD_VAE, layers_per_block=1, norm_num_groups=8, block_out_channels=[16, 16, 32, 32])


def unet_config(family: str, tiny: bool) -> dict[str, Any]:
    """The U-Net config: SD 2.1's shipped one (tiny: same blocks, small channels); SDXL small."""
    if family == "sdxl":
        cfg = json.loads((REPO / "aptp/models/configs/sdxl-unet.json").read_text())
        # SDXL's blocks, two and several BasicTransformerBlocks per transformer, added conditioning
        # (pooled text + 6 time ids); small widths.
        cfg.update(block_out_channels=[32, 64, 64], attention_head_dim=[2, 2, 4], transformer_layers_per_block=[1, 2, 3],
                   norm_num_groups=8, cross_attention_dim=64, addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=32)
        return cfg
    cfg = json.loads((REPO / "aptp/models/configs/sd2.1-unet.json").read_text())
    if tiny:
        cfg.update(block_out_channels=[32, 64, 64, 64], attention_head_dim=[2, 2, 4, 4], norm_num_groups=8,
                   cross_attention_dim=TINY_TEXT["hidden_size"])
    return cfg


def description(family: str, tiny: bool) -> dict[str, Any]:
    """What the pipeline folder holds; a folder whose description differs is rebuilt."""
    text = TINY_TEXT if tiny or family == "sdxl" else SD21_TEXT
    return {"format": "aptp.rehearsal-model/1", "family": family, "tiny": tiny, "unet": unet_config(family, tiny),
            "text_encoder": text, "vae": TINY_VAE if tiny or family == "sdxl" else SD_VAE,
            "scheduler": SDXL_SCHEDULER if family == "sdxl" else SD21_SCHEDULER}


def clip_tokenizer(pad_token: str):
    """The real CLIP BPE tokenizer (49,408 tokens) as a transformers ``CLIPTokenizer``.

    open_clip builds CLIP's vocabulary from its shipped merges file (256 byte symbols, the same
    with ``</w>``, 48,894 merges, then the two special tokens); transformers' tokenizer reads the
    same vocabulary as ``vocab.json`` + ``merges.txt``. Only the special tokens' spelling
    differs (``<start_of_text>`` vs ``<|startoftext|>``).
    """
    import tempfile

    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                              encoding="utf-8")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  pad_token=pad_token, model_max_length=77)
    # the same ids as CLIP's own tokenizer, e.g. for the prompt of this rehearsal
    ours = tokenizer(PROMPT)["input_ids"]
    theirs = [vocab["<|startoftext|>"], *simple.encode(PROMPT), vocab["<|endoftext|>"]]
    if ours != theirs or len(tokenizer) != 49408:
        raise RuntimeError(f"rebuilt CLIP tokenizer disagrees with open_clip: {ours} vs {theirs}")
    return tokenizer


def build_pipeline(folder: Path, family: str, tiny: bool) -> None:
    """Write a pipeline folder with random weights (``save_pretrained``), then its description."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = description(family, tiny)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(d["unet"])
    vae = AutoencoderKL.from_config({**d["vae"], "sample_size": d["unet"]["sample_size"] * 8})
    text = CLIPTextModel(CLIPTextConfig(**d["text_encoder"]))
    print(f"built random modules in {time.perf_counter() - t0:.1f} s", flush=True)
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**d["text_encoder"]))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2,
                                         tokenizer=clip_tokenizer("<|endoftext|>"), tokenizer_2=clip_tokenizer("!"),
                                         unet=unet, scheduler=EulerDiscreteScheduler(**d["scheduler"]))
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer("!"), unet=unet,
                                       scheduler=DDIMScheduler.from_config(d["scheduler"]), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    # the config file exactly as the model ships it (SD 2.1's DDIM config carries PNDM's skip_prk_steps,
    # which DDIMScheduler itself does not keep)
    import diffusers

    sched_cls = "EulerDiscreteScheduler" if family == "sdxl" else "DDIMScheduler"
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": sched_cls, "_diffusers_version": diffusers.__version__, **d["scheduler"]}, indent=2))
    (tmp / DESCRIPTION_FILE).write_text(json.dumps(d, indent=1))
    os.replace(tmp, folder)
    print(f"saved {folder} in {time.perf_counter() - t0:.1f} s", flush=True)


def pipeline_is_current(folder: Path, family: str, tiny: bool) -> bool:
    path = folder / DESCRIPTION_FILE
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(description(family, tiny)))
    except (OSError, ValueError):
        return False


COCO_CAPTIONS = [
    "a red double decker bus driving down a city street", "two dogs playing with a frisbee in a park",
    "a plate of pasta with tomato sauce and basil", "a man riding a wave on top of a surfboard",
    "a cat sleeping on a laptop keyboard", "a kitchen with white cabinets and a steel fridge",
    "a giraffe standing next to a tall tree", "a group of people flying kites on a beach",
    "a train pulling into a station at night", "a bowl of fruit on a wooden table",
    "a skier going down a snowy slope", "a bathroom with a sink and a mirror",
]


def build_coco(root: Path, n_train: int, n_val: int, size: int = 320) -> None:
    """A COCO-2014-schema folder: annotations/captions_{train,val}2014.json + random JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        folder = root / f"{split}2014"
        folder.mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            image_id = 1000 * (split == "val") + i + 1
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            pixels = rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name, quality=90)
            images.append({"id": image_id, "file_name": name, "height": size, "width": size * 4 // 3, "license": 1,
                           "coco_url": "", "flickr_url": "", "date_captured": "2013-11-14 11:18:45"})
            for j in range(2):  # COCO has ~5 captions per image; aptp uses the lowest annotation id
                caption = COCO_CAPTIONS[(i + j) % len(COCO_CAPTIONS)]
                annotations.append({"id": 10 * image_id + j, "image_id": image_id, "caption": caption})
        data = {"info": {"description": "COCO 2014 Dataset (rehearsal stand-in)", "year": 2014}, "licenses": [],
                "images": images, "annotations": annotations}
        (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(data))


def run_measured(name: str, argv: list[str], log_dir: Path, env: dict[str, str],
                 min_free_gib: float = 0.0) -> dict[str, Any]:
    """Run one command as a child process; wall time and peak RSS from ``os.wait4``.

    The child is killed (and the row says so) if the machine's available memory falls below
    ``min_free_gib`` while it runs: on a shared machine the OOM killer might pick a neighbour.
    """
    log = log_dir / f"{name}.log"
    print(f"$ {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(argv) + "\n\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        killed = None
        while True:  # poll, so that a command about to exhaust the machine's memory is stopped first
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            free = mem_available_gib()
            if killed is None and min_free_gib and free is not None and free < min_free_gib:
                killed = f"stopped: only {free:.1f} GiB of memory left (--min-free-gib {min_free_gib})"
                proc.kill()
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    if killed:
        tail.append(killed)
    row = {"command": name, "argv": argv, "exit_code": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "log": str(log), "last_lines": tail}
    print(f"  exit {row['exit_code']}, {row['wall_s']} s, peak RSS {row['peak_rss_gib']} GiB"
          + ("" if row["exit_code"] == 0 else f"\n  {tail[-1] if tail else ''}"), flush=True)
    return row


def mem_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def finetune_need_gib(run: Path, model: Path, ema: bool) -> float:
    """Resident memory fine-tuning expert 0 needs, estimated: its fp32 weights, gradients and the
    two AdamW moments (+ an EMA copy), the teacher pipeline (its weights on disk), ~1.5 GiB of
    imports and activations at 256 px."""
    experts = json.loads((run / "experts.json").read_text())["experts"]
    params = next(e["params"] for e in experts if e["expert"] == 0)
    teacher = sum(p.stat().st_size for p in model.rglob("*.safetensors"))
    return (params * 4 * (5 if ema else 4) + teacher) / 2**30 + 1.5


def folder_size_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30, 2)


def chain(a: argparse.Namespace, model: Path, data: Path, work: Path) -> list[tuple[str, list[str]]]:
    """The CLI commands of the rehearsal, in order."""
    aptp = [sys.executable, "-m", "aptp"]
    run = work / "run"
    common = ["--set", "router.prompt_encoder=all-MiniLM-L6-v2", "--set", f"router.embedding_cache={work / 'emb'}"]
    gen = ["--set", f"generate.height={a.resolution}", "--set", f"generate.width={a.resolution}"]
    evaluation = ["--set", "eval.clip_model=domain-clip", "--set", "eval.fid_features=domain-clip"]
    # SDXL ships an Euler config without PNDM's skip_prk_steps: PNDM built from it needs >= 4 steps
    # (aptp generate says so in one line); DDIM runs any count.
    sampler = ["--set", "generate.scheduler=ddim"] if a.family == "sdxl" else []
    return [
        ("prune", [*aptp, "prune", "--model", str(model), "--recipe", str(a.recipe), "--data", "coco",
                   "--data-root", str(data), "--output", str(run), "--resolution", str(a.resolution),
                   "--experts", str(a.experts), "--batch-size", str(a.batch_size), "--warmup-steps", "1",
                   "--steps", str(a.prune_steps), "--set", "prune.lr_warmup_steps=1", "--quiet", *common, *a.set]),
        ("materialize", [*aptp, "materialize", str(run), "--quiet"]),
        ("finetune", [*aptp, "finetune", str(run), "--expert", "0", "--steps", "2", "--batch-size",
                      str(a.batch_size), "--quiet", *a.set]),
        ("generate", [*aptp, "generate", str(run), PROMPT, "--steps", str(a.sample_steps), "--height",
                      str(a.resolution), "--width", str(a.resolution), "--output", str(work / "samples"), "--quiet",
                      *sampler, *a.set]),
        ("eval", [*aptp, "eval", str(run), "--limit", "2", "--steps", str(a.sample_steps), "--output",
                  str(work / "eval"), "--format", "json", "--quiet", *gen, *evaluation, *sampler, *a.set]),
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| command | exit | wall time (s) | peak RSS (GiB) | CPU time (s) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| `{r['command']}` | – | skipped: {r['skipped']} | | |")
            continue
        lines.append(f"| `{r['command']}` | {r['exit_code']} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['cpu_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd2.1", "sdxl"], default="sd2.1",
                   help="sd2.1: the real SD 2.1 topology (random weights); sdxl: a small random SDXL pipeline.")
    p.add_argument("--tiny", action="store_true", help="A tiny config of the same topology (a dry run, ~1 min on an idle machine).")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "aptp-rehearsal")
    p.add_argument("--keep", action="store_true", help="Keep the data, run directory, samples and eval output.")
    p.add_argument("--recipe", type=Path, default=None, help="Default: recipes/coco-base.yaml (or aptp/recipes/).")
    p.add_argument("--resolution", type=int, default=256, help="Training (and here sampling) resolution.")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--experts", type=int, default=2, help="Experts (at most the batch size).")
    p.add_argument("--prune-steps", type=int, default=2, help="Steps with codes after 1 warm-up step.")
    p.add_argument("--sample-steps", type=int, default=2, help="Denoising steps of generate and eval.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra --set for prune/finetune/generate/eval (repeatable).")
    p.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    p.add_argument("--force-finetune", action="store_true",
                   help="Fine-tune even when the estimated memory exceeds what is available.")
    p.add_argument("--min-free-gib", type=float, default=1.5,
                   help="Kill a command when the machine's available memory drops below this (0: never).")
    p.add_argument("--build-only", action="store_true", help="Only build (or check) the pipeline folder.")
    p.add_argument("--_build", action="store_true", help=argparse.SUPPRESS)  # the child that builds
    a = p.parse_args(argv)
    a.set = [x for kv in a.set for x in ("--set", kv)]
    if a.recipe is None:
        a.recipe = next((REPO / r for r in ("recipes/coco-base.yaml", "aptp/recipes/coco-base.yaml")
                         if (REPO / r).is_file()), REPO / "recipes/coco-base.yaml")
    try:
        import yaml

        a.recipe_ema = bool(((yaml.safe_load(a.recipe.read_text()) or {}).get("finetune") or {}).get("ema", False))
    except (OSError, ValueError, ImportError):
        a.recipe_ema = True
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tag = a.family + ("-tiny" if a.tiny else "")
    model = a.workdir / "models" / tag
    if a._build:
        build_pipeline(model, a.family, a.tiny)
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    work = a.workdir / f"work-{tag}"
    logs = a.workdir / f"logs-{tag}"  # kept: the logs of the last rehearsal of this model
    for folder in (work, logs):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    if pipeline_is_current(model, a.family, a.tiny):
        print(f"reusing {model} ({folder_size_gib(model)} GiB)", flush=True)
    else:
        child = [sys.executable, str(Path(__file__).resolve()), "--_build", "--family", a.family, "--workdir",
                 str(a.workdir)] + (["--tiny"] if a.tiny else [])
        row = run_measured("build pipeline", child, logs, env)
        rows.append(row)
        if row["exit_code"] != 0:
            print(markdown(rows))
            return 1
    size = folder_size_gib(model)
    if a.build_only:
        return 0
    data = work / "coco"
    build_coco(data, n_train=4 * a.batch_size + 4, n_val=4)
    for name, argv_ in chain(a, model, data, work):
        if name == "finetune" and not a.force_finetune:
            # A keep-all SD 2.1 expert with AdamW needs ~20 GiB: on a small shared machine say so
            # instead of pushing it (and its neighbours) into the OOM killer.
            ema = not any(x.replace(" ", "") == "finetune.ema=false" for x in a.set) and a.recipe_ema
            need, free = finetune_need_gib(work / "run", model, ema), mem_available_gib()
            if free is not None and need > 0.85 * free:
                print(f"skipping finetune: it needs about {need:.1f} GiB, {free:.1f} GiB are available "
                      "(--force-finetune runs it anyway; --set finetune.ema=false saves one copy)", flush=True)
                rows.append({"command": name, "argv": argv_, "exit_code": None, "wall_s": None, "peak_rss_gib": None,
                             "cpu_s": None, "log": None, "skipped": f"needs ~{need:.1f} GiB, {free:.1f} GiB available",
                             "last_lines": []})
                continue
        row = run_measured(name, argv_, logs, env, min_free_gib=a.min_free_gib)
        rows.append(row)
        if row["exit_code"] != 0:
            break
    failed = [r for r in rows if r["exit_code"] not in (0, None)]
    result = {"family": a.family, "tiny": a.tiny, "model_folder": str(model), "model_gib": size,
              "recipe": str(a.recipe), "resolution": a.resolution, "batch_size": a.batch_size, "experts": a.experts,
              "prune_steps": a.prune_steps, "sample_steps": a.sample_steps,
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": {"platform": platform.platform(),
              "cpus": os.cpu_count(), "python": platform.python_version()},
              "load_average_after": os.getloadavg(), "rows": rows, "ok": not failed}
    eval_json = work / "eval" / "results.json"
    if eval_json.is_file():
        result["eval"] = json.loads(eval_json.read_text())
    out = a.json or a.workdir / f"rehearsal-{tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{a.family}{' (tiny)' if a.tiny else ''} pipeline {size} GiB, "
          f"load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(markdown(rows))
    print(f"\nresults: {out}")
    if failed:
        print(f"FAILED: {failed[0]['command']} (log {failed[0]['log']}):\n  " + "\n  ".join(failed[0]["last_lines"]))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
