"""fd's FasterDiffusion output against an independent PyTorch reference (tests/fd_reference.py).

The reference shares no code with fd's runtime or split: diffusers' encode_prompt and schedulers, and
its own encoder/decoder halves of the diffusers UNet. It is proven first (every step a key step equals
diffusers' pipelines; its split equals the UNet forward), then fd's FD sampling must equal it, and the
comparison is shown to be sharp enough to catch a wrong cache reuse.
"""
import numpy as np
import pytest
import torch

from fd_reference import (Conditioning, reference_fd_sample, reference_fd_sample_sdxl, sd_pipeline,
                          sdxl_pipeline, make_scheduler, unet_decode, unet_encode)
from fd.runtime.pipeline import FasterDiffusionPipeline
from tests.compare import relative_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

PROMPT = "a photo of an astronaut riding a horse on the moon"
PAPER_KEYS = (0, 1, 2, 3, 5, 10, 15, 25, 35)  # the paper's non-uniform key steps for 50 steps
PAPER_INJECTION = (0.003, 500)  # α, τ
# fd on ONNX Runtime fp32 against the PyTorch reference, max |Δ| relative to the reference's largest value.
# Measured: ~1e-6. The tiny random-weight UNet depends weakly on its timestep, so mistakes move its
# output by only 1.6e-3 to 2e-2 (decoder given the key step's timestep on DPM++-20 is the smallest): a
# 1e-3 tolerance would let that one pass. 3e-5 sits ~30x above fd's error and ~50x below that mistake.
TOLERANCE = 3e-5


def unit_noise(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, 16, 16), dtype=np.float32)


def paper_keys(steps):
    return tuple(k for k in PAPER_KEYS if k < steps)




# --- the reference itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler,steps,negative", [("ddim", 10, None), ("dpmpp-2m", 8, "a horse")])
def test_reference_with_every_step_a_key_step_equals_diffusers(tiny_components, scheduler, steps, negative):
    latents = unit_noise(seed=4)
    ref = reference_fd_sample(tiny_components, [PROMPT], negative, latents, scheduler, steps, 7.5,
                              key_steps=range(steps), noise_injection=None)
    pipe = sd_pipeline(tiny_components, make_scheduler(scheduler, tiny_components.scheduler_config))
    want = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
                latents=torch.from_numpy(latents), output_type="latent").images.numpy()
    assert relative_error(ref, want) <= 1e-6
    assert relative_error(latents, want) > 0.1  # sampling really moved the latents


def split_vs_forward(unet, sample, timesteps, cond):
    with torch.no_grad():
        mid, skips = unet_encode(unet, sample, timesteps, cond)
        split = unet_decode(unet, mid, skips, timesteps, cond)
        full = unet(sample, timesteps, cond.text, added_cond_kwargs=cond.added).sample
    return skips, split, full


def test_reference_split_equals_unet_forward_sd_tiny(tiny_components):
    torch.manual_seed(1)
    cond = Conditioning(torch.randn(2, 77, 32))
    skips, split, full = split_vs_forward(tiny_components.unet, torch.randn(2, 4, 16, 16),
                                          torch.tensor([981, 21]), cond)
    assert len(skips) == 12  # conv_in + 3 + 3 + 3 + 2, as in SD1.5
    assert (split - full).abs().max().item() <= 1e-5
    assert full.abs().max().item() > 1e-2


class TinySDXL:
    """SDXL's structure at toy width: two CLIP text encoders (the second with a projection), text_time
    added conditioning, no attention at the first level, more transformer layers deeper down."""

    def __init__(self, sd_components):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from fd.builder.loading import make_tiny_tokenizer
        self.tokenizer, self.tokenizer_2 = make_tiny_tokenizer(), make_tiny_tokenizer()
        torch.manual_seed(0)
        text_config = dict(vocab_size=len(self.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                           bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
                           pad_token_id=self.tokenizer.pad_token_id)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
        self.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config)).eval()
        self.unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
            norm_num_groups=8, attention_head_dim=(2, 4, 8), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64,  # 32 + 32: both encoders' states
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + 6 time ids × 8
        ).eval()
        self.vae = sd_components.vae  # only read for its scale factor: the outputs are latents
        self.scheduler_config = dict(sd_components.scheduler_config)


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_components):
    return TinySDXL(tiny_components)


def test_reference_split_equals_unet_forward_sdxl_tiny(tiny_sdxl):
    torch.manual_seed(2)
    rows = 2
    cond = Conditioning(torch.randn(rows, 77, 64), {"text_embeds": torch.randn(rows, 32),
                                                     "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * rows)})
    skips, split, full = split_vs_forward(tiny_sdxl.unet, torch.randn(rows, 4, 16, 16), torch.tensor([981, 21]), cond)
    assert len(skips) == 9  # conv_in + 3 + 3 + 2
    assert (split - full).abs().max().item() <= 1e-5
    # the added conditioning really reaches the output: other pooled embeddings change it
    other = Conditioning(cond.text, dict(cond.added, text_embeds=torch.randn(rows, 32)))
    _, changed, _ = split_vs_forward(tiny_sdxl.unet, torch.randn(rows, 4, 16, 16), torch.tensor([981, 21]), other)
    assert (changed - split).abs().max().item() > 1e-3


@pytest.mark.parametrize("negative", [None, "a horse"])
def test_sdxl_reference_with_every_step_a_key_step_equals_diffusers(tiny_sdxl, negative):
    latents, steps = unit_noise(seed=6), 3
    ref = reference_fd_sample_sdxl(tiny_sdxl, [PROMPT], negative, latents, "ddim", steps, 5.0,
                                   key_steps=range(steps), noise_injection=None)
    pipe = sdxl_pipeline(tiny_sdxl, make_scheduler("ddim", tiny_sdxl.scheduler_config))
    want = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=5.0,
                latents=torch.from_numpy(latents), output_type="latent").images.numpy()
    assert relative_error(ref, want) <= 1e-6
    assert relative_error(latents, want) > 0.1


# --- fd against the reference ----------------------------------------------------------------------------

_references = {}


def reference(components, prompts, negative, latents, scheduler, steps, **variant):
    """The reference with the paper's FD settings (or a variant), memoized: several tests reuse it."""
    options = dict(key_steps=paper_keys(steps), noise_injection=PAPER_INJECTION)
    options.update(variant)
    key = (tuple(prompts), negative, latents.tobytes(), scheduler, steps, repr(sorted(options.items())))
    if key not in _references:
        _references[key] = reference_fd_sample(components, prompts, negative, latents, scheduler, steps, 7.5,
                                               max_window=15, **options)
    return _references[key]


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return FasterDiffusionPipeline(tiny_engine, threads=1)


@pytest.mark.parametrize("negative", ["", "a horse"])
@pytest.mark.parametrize("scheduler,steps", [("ddim", 50), ("dpmpp-2m", 20)])
def test_fd_equals_reference(pipe, tiny_components, scheduler, steps, negative):
    latents = unit_noise(seed=1)
    ours = pipe([PROMPT], negative_prompt=negative, steps=steps, scheduler=scheduler, latents=latents)
    assert ours.policy["key_steps"] == list(paper_keys(steps))
    assert ours.policy["noise_injection"] == {"alpha": PAPER_INJECTION[0], "tau": PAPER_INJECTION[1]}
    assert relative_error(ours.latents, reference(tiny_components, [PROMPT], negative, latents, scheduler,
                                                  steps)) <= TOLERANCE


@pytest.mark.parametrize("scheduler,steps", [("ddim", 50), ("dpmpp-2m", 20)])
def test_wrong_fd_variants_are_far_outside_the_tolerance(tiny_components, scheduler, steps):
    """Each mistake a runtime could make moves the output by more than 10× the tolerance, so
    test_fd_equals_reference would catch it."""
    latents = unit_noise(seed=1)
    right = reference(tiny_components, [PROMPT], "", latents, scheduler, steps)
    shifted = tuple(k + 1 if k else k for k in paper_keys(steps))  # 0, 2, 3, 4, 6, 11, …
    wrong = {
        "key steps shifted by one": dict(key_steps=shifted),
        "decoder given the key step's timestep": dict(decode_with_key_timestep=True),
        "no noise injection": dict(noise_injection=None),
        "every step a key step": dict(key_steps=tuple(range(steps))),
    }
    for mistake, variant in wrong.items():
        error = relative_error(reference(tiny_components, [PROMPT], "", latents, scheduler, steps, **variant), right)
        assert error > 10 * TOLERANCE, (mistake, error)


@pytest.fixture(scope="module")
def batch2_pipe(tmp_path_factory):
    """Two images per generation and windows split at 4 steps (the paper's 5-step windows take 2 calls)."""
    from fd.builder.build import BuildOptions, build
    out = build(BuildOptions(model="tiny", max_batch_size=2, max_window=4,
                             out=str(tmp_path_factory.mktemp("fdref") / "tiny-b2")), log=lambda *_: None)
    return FasterDiffusionPipeline(out, threads=1)


def test_fd_two_prompts_in_one_batch_equal_reference(batch2_pipe, tiny_components):
    prompts = ["a photo of a cat", "a painting of a dog on the moon"]
    latents = unit_noise(batch=2, seed=2)
    ours = batch2_pipe(prompts, negative_prompt="a horse", steps=20, scheduler="dpmpp-2m", latents=latents)
    assert ours.calls["denoiser_decoder"] == 10  # windows 1,1,1,2,5,5,5 with 5 = 4 + 1
    want = reference(tiny_components, prompts, "a horse", latents, "dpmpp-2m", 20)
    assert relative_error(ours.latents, want) <= TOLERANCE
    # rows swapped (a wrong image/guidance layout) would be far off
    assert relative_error(ours.latents[::-1], want) > 10 * TOLERANCE
