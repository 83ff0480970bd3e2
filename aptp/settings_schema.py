"""The settings tree itself: one pydantic model per section, every field with its default and
description. Resolution (recipe < env < flags < --set < model defaults) lives in
:mod:`aptp.settings`, which re-exports everything here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, field_validator, model_validator

__all__ = [
    "DataSettings",
    "EvalSettings",
    "FinetuneSettings",
    "GenerateSettings",
    "ModelSettings",
    "PruneSettings",
    "RouterSettings",
    "Settings",
    "SpaceSettings",
]


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

    name: str = Field("toy", description="Model alias (toy, sd2.1, sd1.5, sdxl), local diffusers folder, or hub id.")
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
    max_samples: int | None = Field(
        None, ge=1, description="Use at most this many samples; None = all. The generated shapes world's train split "
        "grows to this size past its default 20,000 (a larger world, the first 20,000 samples unchanged).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = main process).")
    split: str = Field("train", description="Data set split to read.")
    cache_latents: bool = Field(
        False, description="Encode every training image with the VAE once and keep the latent distributions on disk "
        "(data.latent_cache_dir), so pruning and fine-tuning skip the VAE encoder each step (about a fifth of a toy "
        "step on the CPU). Needs a deterministic transform: center_crop true, random_flip false.")
    latent_cache_dir: UserPath | None = Field(
        None, description="Where data.cache_latents keeps its caches (one folder per data set and VAE); "
        "None = ~/.cache/aptp/latents.")

    _check_resolution = field_validator("resolution")(_multiple_of_8)

    @model_validator(mode="after")
    def _cacheable(self) -> "DataSettings":
        if self.cache_latents and self.random_flip:
            raise ValueError("cache_latents: the latents of randomly flipped images cannot be cached; "
                             "set data.random_flip=false or data.cache_latents=false")
        if self.cache_latents and not self.center_crop:
            raise ValueError("cache_latents: the latents of random crops cannot be cached; "
                             "set data.center_crop=true or data.cache_latents=false")
        return self


class RouterSettings(_Section):
    """The prompt router: prompt encoder, architecture predictor and its losses."""

    prompt_encoder: str = Field(
        "all-MiniLM-L6-v2", description="sentence-transformers model embedding the prompts."
    )
    num_experts: int = Field(8, ge=1, description="Number of architecture codes (experts).")
    gumbel_temperature: float = Field(0.4, gt=0, description="Gumbel-Sigmoid temperature of the gates.")
    similarity: Literal["logits", "gates", "centred"] = Field(
        "logits", description="Space of the cosines that route (Eq. 22) and feed Sinkhorn: 'logits' (the paper, "
        "raw code logits), 'gates' (noise-free sigmoid(logit/γ)), 'centred' (logits minus each vector's mean: the "
        "shared keep-all offset removed, so fresh codes are not all cosine 0.9999 apart).")
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
    budget_tolerance: float = Field(
        0.01, gt=0, description="How far the validation prompts' routed mean MACs ratio may end from the budget; "
        "further, prune warns (routing.json: budget_met false).")
    method: Literal["aptp", "uni-arch", "uni-arch-paper", "weight-norm", "taylor", "bk-sdm"] = Field(
        "aptp",
        description="'aptp': prompt-routed experts; 'uni-arch': one learned architecture for all prompts, "
        "warm-started from the router's predicted architectures (stronger than the paper's baseline); "
        "'uni-arch-paper': the paper's Uni-Arch baseline (§4.3), one architecture's two logit vectors trained "
        "directly from keep-all for warmup_steps + steps, no predictor; 'weight-norm': one static architecture "
        "by L1 weight norms (Li et al. 2017), no training; 'taylor': one static architecture by first-order Taylor "
        "importance over diffusion timesteps (Diff-Pruning, Fang et al. 2023), no training; 'bk-sdm': BK-SDM-style "
        "block removal (Kim et al. 2024): whole block pairs removed, least output-sensitive first, as far as the "
        "budget allows, then widths by weight norm to meet it, no training.",
    )
    importance_batches: int = Field(
        8, ge=1, description="--method taylor / bk-sdm: batches of prune.batch_size whose loss gradients the "
        "importance sums / whose output change ranks the blocks (timesteps stratified over the schedule in each).")
    optimal_transport: bool = Field(
        True, description="Balance prompts over codes with Sinkhorn OT. Off (the paper's ablation): each sample "
        "goes to its nearest code while training and the assignment-consistency loss is off too (it would "
        "train toward that same nearest-code assignment); contrastive, resource and distillation losses stay on.")
    distill: bool = Field(True, description="Distill from the unpruned teacher while pruning.")
    snr_gamma: float | None = Field(
        None, gt=0, description="Weight each sample's pruning loss (denoising + distillation) by min-SNR-γ "
        "(Hang et al. 2023), normalised to mean 1 over the timesteps, so nearly clean timesteps do not dominate "
        "what the architectures keep; null = uniform over timesteps (the paper).")
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
    code_lr_scale: float = Field(
        1.0, gt=0,
        description="Multiplier of the learning rate for the architecture-code logits (the predictor keeps the "
        "effective lr). Adam moves a logit about lr per step, so a code started at the keep-all logit +3 needs "
        "~3 / (lr x scale) steps to prune anything: the paper's 3,000 steps at 6.4e-3 move a logit ~19, the toy's "
        "500 at 1e-2 only ~5. Alone it does not bring uni-arch-paper to the budget (the toy stalled at 0.963 of the "
        "MACs at 4; with lambda_res 20 as well it held 0.780). 1 = one rate for both (the paper).",
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
    resource_per: Literal["batch", "expert"] = Field(
        "batch",
        description="What the resource loss holds at the budget: 'batch' (the paper, Eq. 26) = the routed mean "
        "MACs, so experts may sit above or below it as the quality losses decide; 'expert' = every sample's "
        "architecture (the mean of Eq. 26 per sample), so each expert costs about the budget and every prompt "
        "the same MACs (a per-request latency bound; no capacity shifted between prompts).",
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

    steps: int = Field(300, ge=0, description="Fine-tuning steps per expert (paper: 30000, see recipes/); "
                       "with steps_mode 'split', in all.")
    steps_mode: Literal["per-expert", "split"] = Field(
        "per-expert", description="'per-expert': every expert trains `steps` (the paper); 'split': `steps` in all, "
        "shared by the experts in proportion to their routed training samples — the same total compute as one "
        "static model fine-tuned for `steps`.")
    lr: float = Field(5e-5, ge=0, description="Learning rate (paper: 1e-5).")
    batch_size: int = Field(32, ge=1, description="Batch size per process (paper: 128).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    alpha_ddpm: float = Field(1e-4, ge=0, description="Weight of the denoising (DDPM) loss.")
    alpha_distill: float = Field(1.0, ge=0, description="Weight of the distillation loss.")
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="Fraction of training captions replaced by the empty prompt, so the "
        "unconditional branch that classifier-free guidance uses keeps training. 0 = the paper (its "
        "recipes coco-*/cc3m-* set 0); 0.1 lifted every pruned model's CLIP score on the shapes world at "
        "guidance 3 and 7.5 (docs/results-shapes.md).")
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR-γ weights on the fine-tuning losses, mean 1 over the timesteps; "
        "null = uniform (the paper).")
    ema: bool = Field(False, description="Keep an exponential moving average of the weights.")
    ema_decay: float = Field(0.9999, ge=0, le=1, description="EMA decay.")
    checkpoint_every: int = Field(100, ge=1, description="Save a checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=0, description="Keep this many most recent checkpoints.")
    log_every: int = Field(10, ge=1, description="Log metrics every this many steps.")
    mixed_precision: MixedPrecision = Field("no", description="accelerate mixed precision: no | fp16 | bf16.")
    seed: int = Field(0, description="Seed of the fine-tuning run.")


class GenerateSettings(_Section):
    """`aptp generate`: sampling."""

    scheduler: Literal["pndm", "ddim", "default"] = Field(
        "pndm", description="Sampling scheduler: pndm, ddim, or default (the pipeline's own; flow-matching "
                            "models such as SD3 and Flux need it).")
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
    bootstrap: int = Field(
        1000, ge=0, description="Bootstrap resamples of the prompts for the 95% intervals and paired deltas; 0 = off."
    )
    bootstrap_sets: int = Field(
        100, ge=0,
        description="Of those, how many the set-level metrics (FD, CMMD) use: each is a full recomputation "
        "(a 2048-d Inception FD takes ~1.5 s on 2 CPU cores); the first draws, so still paired; 0 = none.",
    )
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap draws (the same draws for every target).")


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
