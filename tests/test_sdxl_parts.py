"""SDXL's torch side: tiny-xl is a real SDXL pipeline, the text graphs reproduce diffusers' encode_prompt,
the split carries SDXL's added conditions, folders round-trip; tiny-v is SD 2.x-shaped."""
import shutil
import warnings

import numpy as np
import pytest
import torch

from fd.builder.families.sd import make_tiny_v_components
from fd.builder.families.sdxl import (
    TextEncoder2XLGraph, TextEncoderXLGraph, make_tiny_xl_components,
    text_time_sizes,
)
from fd.builder.split import UNetDecoder, UNetEncoder, added_condition_names
from fd.builder.families import save_pipeline_folder as save_sdxl_folder
from fd.builder.models import load_folder
from fd.runtime.errors import FdError

PROMPTS = ["a photo of an astronaut riding a horse", "a cat on the moon!"]
# per row: original size (h, w), crop top-left (y, x), target size (h, w); rows differ on purpose
TIME_IDS = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0], [256.0, 192.0, 16.0, 8.0, 128.0, 96.0]])


@pytest.fixture(scope="module")
def tiny_xl():
    return make_tiny_xl_components()


@pytest.fixture(scope="module")
def tiny_xl_folder(tmp_path_factory):
    comps = make_tiny_xl_components()
    comps.options["force_zeros_for_empty_prompt"] = False  # not the default, so the round trip shows it was read
    folder = tmp_path_factory.mktemp("models") / "tiny-xl"
    save_sdxl_folder(comps, str(folder))
    return folder


def sdxl_pipeline(comps):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
        tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
        scheduler=EulerDiscreteScheduler.from_config(comps.scheduler_config), add_watermarker=False)


def ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def rel_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


# --- tiny-xl is SDXL-shaped and runs in diffusers ----------------------------------------------------

def test_tiny_xl_has_sdxl_structure(tiny_xl):
    unet, vae = tiny_xl.unet.config, tiny_xl.vae.config
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    assert unet.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert len(set(unet.transformer_layers_per_block[1:])) > 1  # deeper levels have more transformer layers
    text_widths = tiny_xl.text_encoder.config.hidden_size, tiny_xl.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == sum(text_widths) and text_widths[0] != text_widths[1]
    assert vae.force_upcast and vae.scaling_factor == 0.13025
    sched = tiny_xl.scheduler_config
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert (sched["timestep_spacing"], sched["steps_offset"], sched["prediction_type"]) == ("leading", 1, "epsilon")
    assert tiny_xl.tokenizer_2.pad_token == "!" and tiny_xl.tokenizer.pad_token == "<|endoftext|>"
    assert ids(tiny_xl.tokenizer_2, ["cat"])[0, -1].item() == tiny_xl.tokenizer_2.convert_tokens_to_ids("!")
    assert text_time_sizes(tiny_xl.unet, tiny_xl.text_encoder_2) == {"text_embeds": 32, "time_ids": 6}


def test_tiny_xl_runs_in_diffusers_sdxl_pipeline(tiny_xl):
    pipe = sdxl_pipeline(tiny_xl)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.default_sample_size * pipe.vae_scale_factor == 128  # native image size
    latents = pipe(PROMPTS[0], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 16, 16)
    assert torch.isfinite(latents).all() and latents.abs().max().item() > 1e-2


# --- text encoder graphs -----------------------------------------------------------------------------

def test_text_graphs_reproduce_diffusers_encode_prompt(tiny_xl):
    pipe = sdxl_pipeline(tiny_xl)
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                         num_images_per_prompt=1, do_classifier_free_guidance=False)
        first = TextEncoderXLGraph(tiny_xl.text_encoder)(ids(tiny_xl.tokenizer, PROMPTS))
        second, text_embeds = TextEncoder2XLGraph(tiny_xl.text_encoder_2)(ids(tiny_xl.tokenizer_2, PROMPTS))
    assert prompt_embeds.shape == (2, 77, 32 + 64) and pooled.shape == (2, 32)
    assert torch.equal(torch.cat([first, second], dim=-1), prompt_embeds)
    assert torch.equal(text_embeds, pooled)


@pytest.mark.parametrize("graph_class", [TextEncoderXLGraph, TextEncoder2XLGraph])
def test_text_graphs_export_to_onnx_with_dynamic_batch(tmp_path, tiny_xl, graph_class):
    import onnxruntime as ort
    encoder = tiny_xl.text_encoder if graph_class is TextEncoderXLGraph else tiny_xl.text_encoder_2
    graph = graph_class(encoder).eval()
    outputs = ["text_embeddings"] + (["text_embeds"] if graph_class is TextEncoder2XLGraph else [])
    path = tmp_path / "text.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        torch.onnx.export(graph, (ids(tiny_xl.tokenizer_2, PROMPTS),), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids"], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in ["input_ids", *outputs]})
    batch3 = ids(tiny_xl.tokenizer_2, [*PROMPTS, "dog"])  # another batch size than the export's
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(outputs, {"input_ids": batch3.numpy()})
    with torch.no_grad():
        want = graph(batch3)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert rel_error(torch.from_numpy(g), w) <= 1e-5


# --- the split with SDXL's added conditions ----------------------------------------------------------

def test_split_equals_sdxl_unet_with_per_row_time_ids(tiny_xl):
    unet = tiny_xl.unet
    assert added_condition_names(unet) == ("text_embeds", "time_ids")
    torch.manual_seed(1)
    sample, text, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 96), torch.randn(2, 32)
    timestep = torch.tensor([981.0, 21.0])
    with torch.no_grad():
        cache = UNetEncoder(unet)(sample, timestep, text, pooled, TIME_IDS)
        split = UNetDecoder(unet)(timestep, text, cache[0], cache[1:], text_embeds=pooled, time_ids=TIME_IDS)
        full = unet(sample, timestep, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": TIME_IDS}).sample
        # the same rows with each other's time ids: the conditions really act, per row
        swapped = unet(sample, timestep, text, added_cond_kwargs={"text_embeds": pooled,
                                                                  "time_ids": TIME_IDS.flip(0)}).sample
    assert len(cache) == 10  # mid + conv_in + 3 + 3 + 2 skips, as in SDXL
    assert rel_error(split, full) <= 1e-5
    assert rel_error(swapped, full) > 1e-3


def test_sdxl_decoder_window_equals_separate_calls(tiny_xl):
    unet = tiny_xl.unet
    torch.manual_seed(2)
    sample, text, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 96), torch.randn(2, 32)
    decoder, timesteps, rows = UNetDecoder(unet), [981.0, 601.0, 21.0], 2
    k = len(timesteps)
    with torch.no_grad():
        cache = UNetEncoder(unet)(sample, torch.full((rows,), 981.0), text, pooled, TIME_IDS)
        batched = decoder(torch.tensor(timesteps).repeat_interleave(rows), text.repeat(k, 1, 1),
                          cache[0].repeat(k, 1, 1, 1), tuple(s.repeat(k, 1, 1, 1) for s in cache[1:]),
                          text_embeds=pooled.repeat(k, 1), time_ids=TIME_IDS.repeat(k, 1))
        separate = [decoder(torch.full((rows,), t), text, cache[0], cache[1:], text_embeds=pooled, time_ids=TIME_IDS)
                    for t in timesteps]
    assert rel_error(batched, torch.cat(separate)) <= 1e-5
    assert rel_error(separate[0], separate[2]) > 1e-3  # the per-row timestep really acts


def test_split_needs_the_added_conditions_of_a_text_time_unet(tiny_xl):
    sample, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 96)
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        UNetEncoder(tiny_xl.unet)(sample, torch.tensor([1.0]), text)


def small_unet(**config):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, **config)


@pytest.mark.parametrize(("config", "feature"), [
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"addition_embed_type": "text", "addition_embed_type_num_heads": 4}, "addition_embed_type='text'"),
    ({"time_cond_proj_dim": 16}, "time_cond_proj_dim=16"),
    ({"mid_block_type": None}, "no mid block"),
])
def test_unsupported_unet_feature_is_refused_by_name(config, feature):
    unet = small_unet(**config)
    for half in (UNetEncoder, UNetDecoder):
        with pytest.raises(FdError) as err:
            half(unet)
        message = str(err.value)
        assert feature in message and "\n" not in message


# --- folders -----------------------------------------------------------------------------------------

def test_sdxl_folder_round_trip_keeps_weights_and_settings(tiny_xl, tiny_xl_folder):
    loaded = load_folder(str(tiny_xl_folder), "tiny-xl")
    for name, module in tiny_xl.torch_modules().items():
        want, got = module.state_dict(), loaded.torch_modules()[name].state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[key], got[key]) for key in want), name
    for attr in ("tokenizer", "tokenizer_2"):
        assert torch.equal(ids(getattr(loaded, attr), PROMPTS), ids(getattr(tiny_xl, attr), PROMPTS))
    assert loaded.tokenizer_2.pad_token == "!"
    assert {k: loaded.scheduler_config[k] for k in tiny_xl.scheduler_config} == tiny_xl.scheduler_config
    assert loaded.options["force_zeros_for_empty_prompt"] is False
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_sdxl_folder_with_only_fp16_variant_weights_loads(tmp_path, tiny_xl, tiny_xl_folder):
    folder = tmp_path / "fp16-only"  # what `hf download --include "*.fp16.safetensors"` leaves
    shutil.copytree(tiny_xl_folder, folder)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        (folder / sub / f"{name}.safetensors").rename(folder / sub / f"{name}.fp16.safetensors")
    loaded = load_folder(str(folder), "tiny-xl")
    for name in ("unet", "text_encoder_2"):
        want, got = tiny_xl.torch_modules()[name].state_dict(), loaded.torch_modules()[name].state_dict()
        assert all(torch.equal(want[key], got[key]) for key in want), name


@pytest.mark.parametrize(("damage", "named"), [
    (lambda folder: shutil.rmtree(folder / "text_encoder_2"), "'text_encoder_2'"),
    (lambda folder: (folder / "text_encoder_2" / "model.safetensors").unlink(), "text_encoder_2/"),
    (lambda folder: (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights"),
     "unet/diffusion_pytorch_model.safetensors is damaged"),
    (lambda folder: (folder / "text_encoder_2" / "model.safetensors").write_bytes(b"not weights"),
     "text_encoder_2/model.safetensors is damaged"),
])
def test_incomplete_sdxl_folder_is_one_line_error(tmp_path, tiny_xl_folder, damage, named):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_xl_folder, folder)
    damage(folder)
    with pytest.raises(FdError) as err:
        load_folder(str(folder), "tiny-xl")
    assert named in str(err.value) and "\n" not in str(err.value)


# --- tiny-v ------------------------------------------------------------------------------------------

def test_tiny_v_is_sd2_shaped_and_splits_exactly():
    comps = make_tiny_v_components()
    cfg = comps.unet.config
    assert comps.scheduler_config["prediction_type"] == "v_prediction"
    assert cfg.upcast_attention and cfg.use_linear_projection and len(set(cfg.attention_head_dim)) > 1
    assert all(attn.upcast_attention for name, attn in comps.unet.named_modules() if name.endswith("attn1"))
    assert comps.tokenizer.pad_token == "!"
    torch.manual_seed(3)
    sample, text, timestep = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.tensor([981.0, 21.0])
    with torch.no_grad():
        cache = UNetEncoder(comps.unet)(sample, timestep, text)
        split = UNetDecoder(comps.unet)(timestep, text, cache[0], cache[1:])
        full = comps.unet(sample, timestep, text).sample
    assert len(cache) == 13
    assert rel_error(split, full) <= 1e-5
    assert np.isfinite(full.numpy()).all()
