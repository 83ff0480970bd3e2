"""Shared fixtures: tiny models with Stable Diffusion 2.1's block topology."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2 (pyproject): one thread per worker and its children
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # xdist's workers get COLUMNS=80 / LINES=24 (a fake terminal); the CLI's console would then
    # wrap tables that it writes 240 wide into a pipe, as in a serial run
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# SD 2.1's layout (3 cross-attention down blocks + a plain one, mirrored up blocks, linear
# projections, attention_head_dim read as head counts), scaled down to seconds on a CPU.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 2, 4, 4),
    norm_num_groups=8,
    use_linear_projection=True,
    upcast_attention=True,
)


def make_tiny_unet(seed: int = 0, randomize: bool = True, **overrides):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**TINY_UNET, **overrides})
        if randomize:
            # stock init zeroes some output layers; randomise every tensor so slicing errors show
            with torch.no_grad():
                for p in unet.parameters():
                    p.normal_(0, 0.2)
    return unet.eval()


@pytest.fixture(scope="session")
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture()
def tiny_inputs():
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 400, 900])
    c = torch.randn(3, 7, 32, generator=g)
    return x, t, c


def tiny_pipeline_parts():
    from diffusers import AutoencoderKL, PNDMScheduler
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    from aptp.data.shapes import vocabulary

    words = ["<pad>", "<unk>", "<bos>", "<eos>", *vocabulary()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=24, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            max_position_embeddings=24, eos_token_id=3, bos_token_id=2,
                                            pad_token_id=0))
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                            layers_per_block=1, sample_size=16)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          skip_prk_steps=True, steps_offset=1, prediction_type="v_prediction")
    return dict(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, scheduler=sched)


def make_tiny_pipeline_dir(path, seed: int = 0):
    """A complete tiny StableDiffusionPipeline folder (what `--model FOLDER` reads)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(unet=make_tiny_unet(seed, randomize=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **tiny_pipeline_parts())
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    return make_tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-pipeline") / "pipe")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: thousands of small ops run faster on one
    thread than on two fighting over a busy 2-core box (use with ``pytestmark = usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
