"""Personalized models (issue 24): LoRA fused at build, textual inversion, bad inputs.

Oracles:
- LoRA: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=…)` where peft is installed (it is not a
  dependency of fd; diffusers needs it to load LoRAs), and always an independent merge written here from the
  LoRA definition (W + scale · alpha/rank · B @ A, B's 1x1 kernel over A's for convolutions) with the A and B
  this test drew itself, so the test holds without peft.
- textual inversion: diffusers' `load_textual_inversion` (needs no peft), its tokenizer and embedding table,
  and diffusers' pipeline with it (which expands multi-vector tokens in prompts).
- the built folder: its baseline equals diffusers' pipeline with the same LoRA and embedding; FD equals the
  independent reference (tests/fd_reference.py) on the same adapted components.
The LoRA and embedding files are made here: random low-rank weights for the tiny model, in the diffusers/peft
layout (text-encoder keys with and without `text_model.`) and kohya's (`lora_unet_…`, `.alpha`).
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fd.builder.adapt import Adaptations, adapt
from fd.builder.build import BuildOptions, build
from fd.builder.families.sd import make_tiny_components
from fd.runtime.errors import FdError
from fd.runtime.tokenizer import expand_tokens
from tests.compare import assert_equals_diffusers, pixels, relative_error
from tests.test_fd_reference import PAPER_INJECTION, TOLERANCE, paper_keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

HAS_PEFT = importlib.util.find_spec("peft") is not None
UNET_TARGETS = ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0", "ff.net.2", "proj_in",
                "resnets.0.conv1", "time_emb_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "out_proj", "fc1")
TOKEN = "<cat-toy>"
PROMPT = f"a photo of {TOKEN} on the moon"
RANK = 2


def draw_lora(comps, seed: int, rank: int = RANK, components=("unet", "text_encoder")) -> list[tuple]:
    """[(component, layer name, A, B)] for the targeted layers: random low-rank factors big enough to matter."""
    g = torch.Generator().manual_seed(seed)
    factors = []
    for component in components:
        targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        for name, layer in getattr(comps, component).named_modules():
            if name.endswith(targets):
                w = layer.weight
                a = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.3
                b = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.3
                factors.append((component, name, a, b))
    return factors


def peft_file(factors, text_model_prefix: bool) -> dict:
    """The diffusers/peft layout: `unet.<layer>.lora_A.weight`, `text_encoder.[text_model.]<layer>.lora_B.weight`."""
    out = {}
    for component, name, a, b in factors:
        if component.startswith("text_encoder") and text_model_prefix and not name.startswith("text_model."):
            name = f"text_model.{name}"
        out[f"{component}.{name}.lora_A.weight"], out[f"{component}.{name}.lora_B.weight"] = a, b
    return out


def kohya_file(factors, alpha: float) -> dict:
    """kohya/A1111: `lora_unet_<layer with _>.lora_down.weight`, `lora_te_text_model_…`, one `.alpha` each."""
    out = {}
    for component, name, a, b in factors:
        stem = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + name.replace(".", "_")
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = a, b
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def independent_merge(comps, factors, scale: float, alpha_over_rank: float = 1.0) -> None:
    """W ← W + scale · alpha/rank · B @ A, written from the definition (not fd's code)."""
    with torch.no_grad():
        for component, name, a, b in factors:
            layer = dict(getattr(comps, component).named_modules())[name]
            if a.ndim == 4:  # conv: out x in x kh x kw = Σ_r B[o, r] A[r, i, kh, kw]
                delta = (b[:, :, 0, 0] @ a.flatten(1)).reshape(layer.weight.shape)
            else:
                delta = b @ a
            layer.weight += scale * alpha_over_rank * delta


def max_weight_difference(x, y, components=("unet", "text_encoder")) -> float:
    worst = 0.0
    for component in components:
        a, b = getattr(x, component).state_dict(), getattr(y, component).state_dict()
        assert set(a) == set(b)
        worst = max(worst, max((a[k].float() - b[k].float()).abs().max().item() for k in a))
    return worst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """LoRA and embedding files for the tiny model, and the factors they hold."""
    folder = tmp_path_factory.mktemp("personal")
    comps = make_tiny_components()
    factors = draw_lora(comps, seed=1)
    width = comps.text_encoder.config.hidden_size
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(2))  # a 3-vector token
    paths = {"peft": folder / "peft.safetensors", "peft-bare": folder / "peft-bare.safetensors",
             "kohya": folder / "kohya.safetensors", "embedding": folder / "cat-toy.safetensors",
             "a1111": folder / "a1111.safetensors"}
    save_file(peft_file(factors, text_model_prefix=True), paths["peft"])
    save_file(peft_file(factors, text_model_prefix=False), paths["peft-bare"])
    save_file(kohya_file(factors, alpha=1.0), paths["kohya"])  # alpha 1, rank 2: every update at half strength
    save_file({TOKEN: vectors}, paths["embedding"])  # diffusers' layout: {token: vectors}
    save_file({"emb_params": vectors[:1]}, paths["a1111"])  # A1111's safetensors: no token inside
    return paths, factors, vectors


# --- LoRA: the fused weights --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,alpha_over_rank", [("peft", 1.0), ("peft-bare", 1.0), ("kohya", 0.5)])
def test_fused_lora_equals_independent_merge_and_diffusers(files, layout, alpha_over_rank):
    paths, factors, _ = files
    ours = make_tiny_components()
    records = adapt(ours, Adaptations(loras=(f"{paths[layout]}:0.7",)), log=lambda *_: None).records
    assert records[0]["scale"] == 0.7 and records[0]["modules"] == len(factors)

    want = make_tiny_components()
    independent_merge(want, factors, 0.7, alpha_over_rank)
    assert max_weight_difference(ours, want) <= 1e-6
    # sharp: the merge without kohya's alpha/rank, or without the scale, is far off
    wrong = make_tiny_components()
    independent_merge(wrong, factors, 0.7 if layout == "kohya" else 1.0, 1.0)
    assert max_weight_difference(ours, wrong) > 1e-2

    if HAS_PEFT:  # diffusers' own loading and fusing
        from diffusers import DDIMScheduler
        from fd.builder.families.sd import FAMILY
        theirs = make_tiny_components()
        pipe = FAMILY.diffusers_pipeline(theirs, DDIMScheduler.from_config(theirs.scheduler_config))
        pipe.load_lora_weights(str(paths[layout]))
        pipe.fuse_lora(lora_scale=0.7)
        pipe.unload_lora_weights()  # drops the adapter layers, keeps the fused weights
        assert max_weight_difference(ours, theirs) <= 1e-6


def test_two_loras_add_up(files):
    paths, factors, _ = files
    ours = make_tiny_components()
    adapt(ours, Adaptations(loras=(f"{paths['peft']}:0.5", f"{paths['kohya']}:-1")), log=lambda *_: None)
    want = make_tiny_components()
    independent_merge(want, factors, 0.5)
    independent_merge(want, factors, -1.0, 0.5)
    assert max_weight_difference(ours, want) <= 1e-6


def test_sdxl_lora_with_both_text_encoders(tmp_path):
    from fd.builder.families.sdxl import make_tiny_xl_components
    parts = ("unet", "text_encoder", "text_encoder_2")
    factors = draw_lora(make_tiny_xl_components(), seed=3, components=parts)
    path = tmp_path / "xl.safetensors"
    save_file(peft_file(factors, text_model_prefix=True), path)
    ours = make_tiny_xl_components()
    adapt(ours, Adaptations(loras=(f"{path}:0.6",)), log=lambda *_: None)
    want = make_tiny_xl_components()
    independent_merge(want, factors, 0.6)
    assert max_weight_difference(ours, want, parts) <= 1e-6
    assert {f[0] for f in factors} == set(parts)
    if HAS_PEFT:
        from diffusers import EulerDiscreteScheduler
        from fd.builder.families.sdxl import FAMILY
        theirs = make_tiny_xl_components()
        pipe = FAMILY.diffusers_pipeline(theirs, EulerDiscreteScheduler.from_config(theirs.scheduler_config))
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=0.6)
        pipe.unload_lora_weights()
        assert max_weight_difference(ours, theirs, parts) <= 1e-6


# --- textual inversion ----------------------------------------------------------------------------------

def test_textual_inversion_equals_diffusers_load_textual_inversion(files):
    paths, _, vectors = files
    from diffusers import DDIMScheduler
    from fd.builder.families.sd import FAMILY
    ours = make_tiny_components()
    adapted = adapt(ours, Adaptations(textual_inversions=(str(paths["embedding"]),
                                                          f"{paths['a1111']}:<single>")), log=lambda *_: None)
    assert [r["token"] for r in adapted.records] == [TOKEN, "<single>"]
    assert adapted.expansions == [{TOKEN: f"{TOKEN} {TOKEN}_1 {TOKEN}_2"}]

    theirs = make_tiny_components()
    pipe = FAMILY.diffusers_pipeline(theirs, DDIMScheduler.from_config(theirs.scheduler_config))
    pipe.load_textual_inversion(str(paths["embedding"]))
    pipe.load_textual_inversion(str(paths["a1111"]), token="<single>")
    assert ours.tokenizer.get_vocab() == theirs.tokenizer.get_vocab()
    table, want = ours.text_encoder.get_input_embeddings().weight, theirs.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, want)
    ids = ours.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"])
    assert torch.equal(table[ids], vectors)
    # the runtime's expansion is diffusers' maybe_convert_prompt
    assert expand_tokens(PROMPT, adapted.expansions[0]) == pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)


# --- Custom Diffusion -------------------------------------------------------------------------------------

def test_custom_diffusion_equals_diffusers_custom_diffusion_processors(tmp_path):
    """Baked projections give the UNet forward of diffusers' CustomDiffusionAttnProcessor with the same file."""
    comps, g = make_tiny_components(), torch.Generator().manual_seed(5)
    layers = dict(comps.unet.named_modules())
    weights = {}
    for i, name in enumerate(n for n in layers if n.endswith("attn2")):
        attention = layers[name]
        for part, layer in (("to_k", attention.to_k), ("to_v", attention.to_v)) + (
                (("to_q", attention.to_q), ("to_out", attention.to_out[0])) if i == 0 else ()):  # train_q_out once
            stem = f"{name}.processor.{part}_custom_diffusion" + (".0" if part == "to_out" else "")
            weights[f"{stem}.weight"] = torch.randn(layer.weight.shape, generator=g) * 0.2
            if layer.bias is not None:
                weights[f"{stem}.bias"] = torch.randn(layer.bias.shape, generator=g) * 0.2
    path = tmp_path / "pytorch_custom_diffusion_weights.safetensors"
    save_file(weights, path)
    records = adapt(comps, Adaptations(custom_diffusion=(str(path),)), log=lambda *_: None).records
    assert records[0]["kind"] == "custom_diffusion" and records[0]["attention_layers"] == 16

    theirs, plain = make_tiny_components().unet, make_tiny_components().unet
    # diffusers' own processors for the file (load_attn_procs builds them with _process_custom_diffusion, but
    # diffusers 0.42 sets them only when given a pipeline, so they are set here)
    processors = dict(theirs.attn_processors)
    processors.update(theirs._process_custom_diffusion(dict(weights)))
    theirs.set_attn_processor(processors)
    sample, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 500.0])
    text = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want = theirs(sample, t, text).sample.numpy()
        assert relative_error(comps.unet(sample, t, text).sample.numpy(), want) <= 1e-5
        assert relative_error(plain(sample, t, text).sample.numpy(), want) > 1e-2  # the weights matter


# --- a built folder: LoRA + embedding, against diffusers and the FD reference ---------------------------------

@pytest.fixture(scope="module")
def personal_engine(files, tmp_path_factory):
    paths, _, _ = files
    out = tmp_path_factory.mktemp("engines") / "tiny-personal"
    build(BuildOptions(model="tiny", out=str(out),
                       adaptations=Adaptations(loras=(f"{paths['kohya']}:0.8",),
                                               textual_inversions=(str(paths["embedding"]),))),
          log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def adapted_components(files):
    """The tiny model with the same LoRA and embedding applied by the oracles (diffusers where it can)."""
    paths, factors, _ = files
    from diffusers import DDIMScheduler
    from fd.builder.families.sd import FAMILY
    comps = make_tiny_components()
    pipe = FAMILY.diffusers_pipeline(comps, DDIMScheduler.from_config(comps.scheduler_config))
    if HAS_PEFT:
        pipe.load_lora_weights(str(paths["kohya"]))
        pipe.fuse_lora(lora_scale=0.8)
        pipe.unload_lora_weights()
    else:
        independent_merge(comps, factors, 0.8, 0.5)
    pipe.load_textual_inversion(str(paths["embedding"]))
    return comps


def test_manifest_records_each_adaptation(personal_engine, files):
    paths, factors, _ = files
    import hashlib
    manifest = json.loads((personal_engine / "manifest.json").read_text())
    lora, embedding = manifest["adaptations"]
    assert lora == {"kind": "lora", "file": str(paths["kohya"]), "scale": 0.8, "modules": len(factors),
                    "sha256": hashlib.sha256(paths["kohya"].read_bytes()).hexdigest()}
    assert embedding["token"] == TOKEN and embedding["vectors"] == 3
    assert manifest["tokenizers"][0]["expansions"] == {TOKEN: f"{TOKEN} {TOKEN}_1 {TOKEN}_2"}


def test_personal_folder_baseline_equals_diffusers_and_fd_equals_reference(personal_engine, adapted_components):
    import diffusers
    from fd.runtime.pipeline import FasterDiffusionPipeline
    from fd.runtime.policy import FasterDiffusionPolicy, NoiseInjection
    from fd_reference import reference_fd_sample
    comps, steps = adapted_components, 10
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    pipe = FasterDiffusionPipeline(personal_engine)
    ours = pipe([PROMPT], steps=steps, latents=latents, policy=FasterDiffusionPolicy.baseline(steps))
    oracle = diffusers.StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=diffusers.DDIMScheduler.from_config(comps.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    oracle.set_progress_bar_config(disable=True)
    want = {kind: oracle(PROMPT, num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(latents),
                         output_type=kind).images for kind in ("latent", "np")}
    assert_equals_diffusers(ours, want["latent"].numpy(), (want["np"] * 255).round().astype(np.int16))
    # the token matters: the same prompt without the embedding's expansion is another image
    plain = pipe([PROMPT.replace(TOKEN, "cat")], steps=steps, latents=latents,
                 policy=FasterDiffusionPolicy.baseline(steps))
    assert relative_error(plain.latents, want["latent"].numpy()) > 1e-2

    keys = paper_keys(steps)
    fd = pipe([PROMPT], steps=steps, latents=latents,
              policy=FasterDiffusionPolicy(keys, 15, NoiseInjection(*PAPER_INJECTION)))
    reference = reference_fd_sample(comps, [PROMPT], "", latents, "ddim", steps, 7.5, keys, PAPER_INJECTION)
    assert relative_error(fd.latents, reference) <= TOLERANCE
    assert pixels(fd.images).std() > 20


@pytest.fixture(scope="module")
def refittable_engine(files, tmp_path_factory):
    """The personal folder's twin without its LoRA, built --refittable: the LoRA comes at run time (and up to two
    images per generation, for fd-serve's batches)."""
    paths, _, _ = files
    out = tmp_path_factory.mktemp("engines") / "tiny-refittable"
    build(BuildOptions(model="tiny", out=str(out), refittable=True, max_batch_size=2,  # fd-serve batches two
                       adaptations=Adaptations(textual_inversions=(str(paths["embedding"]),))), log=lambda *_: None)
    return out


def test_run_time_lora_equals_the_same_lora_fused_at_build(refittable_engine, personal_engine, files, tmp_path):
    from fd.runtime.pipeline import FasterDiffusionPipeline
    from fd.runtime.policy import FasterDiffusionPolicy, NoiseInjection
    paths, factors, _ = files
    steps, latents = 10, np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    policy = FasterDiffusionPolicy(paper_keys(steps), 15, NoiseInjection(*PAPER_INJECTION))

    def run(pipe):
        return pipe([PROMPT], steps=steps, latents=latents, policy=policy).latents
    fused = run(FasterDiffusionPipeline(personal_engine))
    pipe = FasterDiffusionPipeline(refittable_engine)
    base = run(pipe)
    vae, text = pipe.runner.sessions["vae_decoder"], pipe.runner.sessions["text_encoder"]
    assert relative_error(base, fused) > 1e-2  # the LoRA changes the image: the comparisons below can fail

    swapped = pipe.set_loras([f"{paths['kohya']}:0.8"])
    assert swapped["graphs"] == ["text_encoder", "denoiser_encoder", "denoiser_decoder"]
    assert pipe.runner.sessions["vae_decoder"] is vae  # a graph the LoRA does not change is not reloaded
    assert relative_error(run(pipe), fused) <= 1e-5

    # a LoRA of the UNet alone: the text encoder goes back to its base weights, the UNet gets the new ones
    unet_only = tmp_path / "unet-only.safetensors"
    save_file(peft_file([f for f in factors if f[0] == "unet"], True), unet_only)
    assert pipe.set_loras([(unet_only, 0.5)])["graphs"] == ["text_encoder", "denoiser_encoder", "denoiser_decoder"]
    assert pipe.set_loras([(unet_only, 0.5)])["graphs"] == ["denoiser_encoder", "denoiser_decoder"]
    assert pipe.runner.sessions["vae_decoder"] is vae
    assert pipe.set_loras([])["graphs"] == ["denoiser_encoder", "denoiser_decoder"]
    assert np.array_equal(run(pipe), base)  # no LoRA: the folder's own weights again
    assert pipe.runner.sessions["text_encoder"] is not text  # reloaded once, with its base weights

    with pytest.raises(FdError, match="without --refittable"):
        FasterDiffusionPipeline(personal_engine).set_loras([str(paths["peft"])])
    with pytest.raises(FdError, match="text_encoder_2"):
        sdxl = tmp_path / "sdxl.safetensors"
        save_file({**peft_file(factors, True),
                   "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
                   "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)},
                  sdxl)
        pipe.set_loras([str(sdxl)])


def test_tensorrt_refit_equals_the_same_lora_fused_at_build(files, tmp_path):
    """TensorRT's Refitter path (runtime/backends/trt_refit.py); runs only where TensorRT and a GPU are."""
    from tests.test_tensorrt import GPU_SKIP
    if GPU_SKIP is not None:
        pytest.skip(GPU_SKIP)
    from fd.runtime.pipeline import FasterDiffusionPipeline
    from fd.runtime.policy import FasterDiffusionPolicy
    paths, _, _ = files
    lora = f"{paths['kohya']}:0.8"

    def folder(name, **options):
        return build(BuildOptions(model="tiny", backend="tensorrt", precision="fp32", out=str(tmp_path / name),
                                  **options), log=lambda *_: None)
    fused = FasterDiffusionPipeline(folder("fused", adaptations=Adaptations(loras=(lora,))))
    refit = FasterDiffusionPipeline(folder("refit", refittable=True))
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)

    def run(pipe):
        return pipe(["a photo of a cat"], steps=10, latents=latents, policy=FasterDiffusionPolicy.baseline(10)).latents
    base = run(refit)
    assert refit.set_loras([lora])["graphs"] == ["text_encoder", "denoiser_encoder", "denoiser_decoder"]
    want = run(fused)
    assert relative_error(base, want) > 1e-2
    assert relative_error(run(refit), want) <= 1e-3
    refit.set_loras([])
    assert relative_error(run(refit), base) <= 1e-5


def test_expansion_leaves_other_prompts_alone():
    assert expand_tokens("a dog", {TOKEN: f"{TOKEN} {TOKEN}_1"}) == "a dog"
    assert expand_tokens(f"{TOKEN} and {TOKEN}", {TOKEN: f"{TOKEN} {TOKEN}_1"}) == \
        f"{TOKEN} {TOKEN}_1 and {TOKEN} {TOKEN}_1"


# --- bad inputs: one line, nothing written ------------------------------------------------------------------

def bad_file(folder, name, tensors, metadata=None):
    path = folder / name
    save_file(tensors, path, metadata=metadata)
    return str(path)


def bad_inputs(folder, files):
    paths, factors, _ = files
    peft = peft_file(factors, True)
    first = next(iter(peft))
    second = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    sdxl = dict(peft, **{f"{second}.lora_A.weight": torch.zeros(2, 32), f"{second}.lora_B.weight": torch.zeros(32, 2)})
    wide = {k: (torch.zeros(v.shape[0], v.shape[1] * 2, *v.shape[2:]) if ".lora_A." in k else v)
            for k, v in peft.items()}
    return [
        (["--lora", str(folder / "missing.safetensors")], "no such file"),
        (["--lora", bad_file(folder, "x.ckpt", {"a": torch.zeros(1)})], "pickle"),
        (["--lora", bad_file(folder, "sdxl.safetensors", sdxl)], "text_encoder_2"),
        (["--lora", bad_file(folder, "wide.safetensors", wide)], "another model"),
        (["--lora", bad_file(folder, "unknown.safetensors", {**peft, "unet.foo.lora_A.weight": peft[first].clone()})],
         "does not have"),
        (["--lora", bad_file(folder, "odd.safetensors", {"lora_unet_x.weird": torch.zeros(1)})], "unknown key"),
        (["--textual-inversion", f"{paths['a1111']}:a"], "already in the vocabulary"),
        (["--textual-inversion", bad_file(folder, "narrow.safetensors", {"<n>": torch.zeros(2, 7)})], "7 wide"),
        (["--textual-inversion", str(paths["embedding"]), "--textual-inversion", str(paths["embedding"])],
         "already in the vocabulary"),
        (["--model", "tiny-dit", "--lora", str(paths["peft"])], "drop --lora"),
        (["--custom-diffusion", bad_file(folder, "cd.safetensors", {"x.processor.to_k_custom_diffusion.weight":
                                                                     torch.zeros(32, 32)})], "does not have"),
    ]


def test_bad_inputs_get_one_line_and_leave_nothing(files, tmp_path, capsys):
    from fd.builder.cli import main
    for number, (args, words) in enumerate(bad_inputs(tmp_path, files)):
        out = tmp_path / f"engine-{number}"
        model = [] if "--model" in args else ["--model", "tiny"]
        assert main([*model, *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, (args, err)
        assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# --- single-file checkpoints ------------------------------------------------------------------------------
# The tiny pipeline written in the original (CompVis/LDM) layout that single-file checkpoints use. The key
# correspondence is the published one (diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py
# tables); the code is this test's. Reading it back must give the tiny pipeline's weights exactly.

def _unet_block_prefixes() -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) for SD's 4-level UNet with 2 resnets per down block."""
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i < 3:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i > 0:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        if i < 3:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    pairs += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
              ("mid_block.resnets.1.", "middle_block.2.")]
    return pairs


UNET_WHOLE = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _replace_prefix(key: str, pairs) -> str:
    for ours, theirs in pairs:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def original_layout(comps) -> dict:
    out = {}
    for key, value in comps.unet.state_dict().items():
        new = _replace_prefix(key, UNET_WHOLE.items())
        if "resnets." in key:
            head, _, tail = key.rpartition("resnets.")
            index, _, rest = tail.partition(".")
            layer, _, param = rest.partition(".")
            new = f"{head}resnets.{index}.{RESNET_PARTS.get(layer, layer)}.{param}"
        new = _replace_prefix(new, _unet_block_prefixes())
        out[f"model.diffusion_model.{new}"] = value
    levels = len(comps.vae.config.block_out_channels)
    for key, value in comps.vae.state_dict().items():
        new = key
        for half in ("encoder", "decoder"):
            for i in range(levels):
                up = levels - 1 - i  # the original numbers up blocks the other way round
                new = new.replace(f"{half}.down_blocks.{i}.resnets.", f"{half}.down.{i}.block.")
                new = new.replace(f"{half}.down_blocks.{i}.downsamplers.0.", f"{half}.down.{i}.downsample.")
                new = new.replace(f"{half}.up_blocks.{i}.resnets.", f"{half}.up.{up}.block.")
                new = new.replace(f"{half}.up_blocks.{i}.upsamplers.0.", f"{half}.up.{up}.upsample.")
            for j in range(2):
                new = new.replace(f"{half}.mid_block.resnets.{j}.", f"{half}.mid.block_{j + 1}.")
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for ours, theirs in VAE_ATTENTION.items():
                new = new.replace(f"attn_1.{ours}", f"attn_1.{theirs}")
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value[:, :, None, None]  # 1x1 convolutions in the original
        out[f"first_stage_model.{new}"] = value
    for key, value in comps.text_encoder.state_dict().items():  # transformers 5 names have no text_model.
        out[f"cond_stage_model.transformer.text_model.{key}"] = value
    return {key: value.contiguous().clone() for key, value in out.items()}


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_folder):
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-dreambooth.safetensors"
    save_file(original_layout(make_tiny_components()), path)
    return path


def test_single_file_checkpoint_loads_the_exact_weights(single_file, tiny_folder):
    from fd.builder.models import load_components
    comps = load_components(str(single_file), config=str(tiny_folder))
    want = make_tiny_components()
    parts = ("unet", "vae", "text_encoder")
    assert max_weight_difference(comps, want, parts) == 0.0
    assert comps.source["kind"] == "single_file"
    assert comps.source["sha256"] == __import__("hashlib").sha256(single_file.read_bytes()).hexdigest()
    # sharp: a checkpoint with one UNet tensor changed is seen
    state = original_layout(want)
    state["model.diffusion_model.out.2.bias"] += 1.0
    changed = single_file.with_name("changed.safetensors")
    save_file(state, changed)
    assert max_weight_difference(load_components(str(changed), config=str(tiny_folder)), want, parts) == 1.0


def test_single_file_refusals(single_file, tiny_folder, tmp_path, capsys):
    from fd.builder.cli import main
    only_tokenizer = tmp_path / "only-tokenizer"
    (only_tokenizer / "tokenizer").mkdir(parents=True)
    for name in (tiny_folder / "tokenizer").iterdir():
        (only_tokenizer / "tokenizer" / name.name).write_bytes(name.read_bytes())
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    cases = [
        ([str(single_file)], "--config FOLDER"),
        ([str(pickle), "--config", str(tiny_folder)], "pickle"),
        ([str(single_file), "--config", str(only_tokenizer)], "diffusers cannot load it"),  # fd's SD1.5 configs
        (["tiny", "--config", str(tiny_folder)], "drop --config"),
    ]
    capsys.readouterr()
    for number, (model, words) in enumerate(cases):
        target = tmp_path / f"bad-{number}"
        assert main(["--model", *model, "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, (model, err)
        assert not target.exists()


# --- run-time LoRA as part of the request: the API, fd-run, fd-serve, fd-bench; the torch backend ---------------

def fd_latents(pipe, **fields):
    from fd.runtime.policy import FasterDiffusionPolicy, NoiseInjection
    steps = 10
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    policy = FasterDiffusionPolicy(paper_keys(steps), 15, NoiseInjection(*PAPER_INJECTION))
    return pipe([PROMPT], steps=steps, latents=latents, policy=policy, **fields)


def test_a_requests_loras_are_swapped_in_only_when_the_set_changes(refittable_engine, personal_engine, files):
    from fd.runtime.pipeline import EngineFolder, FasterDiffusionPipeline
    from fd.runtime.request import Request
    paths, _, _ = files
    lora = f"{paths['kohya']}:0.8"
    fused = fd_latents(FasterDiffusionPipeline(personal_engine)).latents
    pipe = FasterDiffusionPipeline(refittable_engine)
    base = fd_latents(pipe, loras=[])
    assert "lora_swap" not in base.timings  # no LoRA set yet: nothing to swap
    with_lora = fd_latents(pipe, loras=[lora])
    assert with_lora.timings["lora_swap"] > 0 and relative_error(with_lora.latents, fused) <= 1e-5
    assert relative_error(base.latents, fused) > 1e-2
    again = fd_latents(pipe, loras=[(paths["kohya"], 0.8)])  # the same set, as a pair: no swap
    assert "lora_swap" not in again.timings and np.array_equal(again.latents, with_lora.latents)
    assert "lora_swap" not in fd_latents(pipe).timings  # loras=None: the pipeline's current set
    weaker = fd_latents(pipe, loras=[f"{paths['kohya']}:0.4"])  # another scale is another set
    assert "lora_swap" in weaker.timings and relative_error(weaker.latents, fused) > 1e-3
    assert np.array_equal(fd_latents(pipe, loras=[]).latents, base.latents)

    with pytest.raises(FdError, match="without --refittable"):  # checked against the folder, no engine loaded
        EngineFolder(personal_engine).prepare(Request(prompts=["a cat"], loras=[lora]))
    for bad, words in [("style.safetensors", "must be a list"), ([("x.safetensors", "big")], "is not a number"),
                       ([("x.safetensors", float("nan"))], "finite number"), (["x.safetensors:inf"], "finite number"),
                       ([""], "file name is empty"), ([3], "neither")]:
        with pytest.raises(FdError, match=words):
            Request(prompts=["a cat"], loras=bad)
    assert Request(prompts=["a"], loras=["a:b.safetensors", "c.safetensors:-0.5"]).loras == (
        ("a:b.safetensors", 1.0), ("c.safetensors", -0.5))


def test_fd_run_fd_serve_and_the_api_declare_loras_alike():
    from fd.runtime.cli import parse_args, request_from_args
    from fd.runtime.request import Request
    from fd.serve.api import BadRequest, parse_image_request
    run = request_from_args(parse_args(["--engine-dir", "x", "--prompt", "a", "--lora", "x.safetensors:0.5",
                                        "--lora", "y.safetensors"]))
    served = parse_image_request(b'{"prompt": "a", "loras": [{"name": "x.safetensors", "scale": 0.5}, '
                                 b'{"name": "y.safetensors"}]}')
    api = Request(prompts=["a"], loras=[("x.safetensors", 0.5), "y.safetensors"])
    assert run.loras == served.loras == api.loras == (("x.safetensors", 0.5), ("y.safetensors", 1.0))
    assert request_from_args(parse_args(["--engine-dir", "x", "--prompt", "a"])).loras == ()  # none, as served
    with pytest.raises(FdError) as from_run:
        request_from_args(parse_args(["--engine-dir", "x", "--prompt", "a", "--lora", "x.safetensors:inf"]))
    with pytest.raises(BadRequest) as from_serve:
        parse_image_request(b'{"prompt": "a", "loras": [{"name": "x.safetensors", "scale": 1e999}]}')
    with pytest.raises(FdError) as from_api:
        Request(prompts=["a"], loras=[("x.safetensors", float("inf"))])
    assert str(from_run.value) == from_serve.value.message == str(from_api.value)
    assert "the scale must be a finite number" in str(from_api.value) and from_serve.value.status == 422


def test_fd_run_and_fd_bench_take_lora(refittable_engine, personal_engine, files, tmp_path, capsys):
    from fd.benchmarks.cli import main as fd_bench
    from fd.runtime.cli import main as fd_run
    paths, _, _ = files
    lora = f"{paths['kohya']}:0.8"
    assert fd_run(["--engine-dir", str(refittable_engine), "--prompt", "a cat", "--steps", "2", "--lora", lora,
                   "--out", str(tmp_path / "cat.png")]) == 0
    assert "LoRA applied in" in capsys.readouterr().out
    record = tmp_path / "bench.json"
    assert fd_bench(["--engine-dir", str(refittable_engine), "--steps", "2", "--runs", "2", "--warmup", "0",
                     "--lora", lora, "--json", str(record)]) == 0
    out = capsys.readouterr().out
    swap = json.loads(record.read_text())["lora"]
    assert swap["graphs"] == ["text_encoder", "denoiser_encoder", "denoiser_decoder"] and swap["rounds"] == 2
    assert swap["apply_seconds"]["n"] == swap["remove_seconds"]["n"] == 2
    assert 0 < swap["apply_seconds"]["min"] <= swap["apply_seconds"]["max"] and swap["remove_seconds"]["min"] > 0
    assert "LoRA swap (kohya.safetensors:0.8; text_encoder, denoiser_encoder, denoiser_decoder): apply" in out
    for args, words in [(["--engine-dir", str(personal_engine), "--lora", lora], "without --refittable"),
                        (["--engine-dir", str(refittable_engine), "--lora", lora, "--compare", "diffusers"],
                         "--compare diffusers"),
                        (["--engine-dir", str(refittable_engine), "--lora", str(tmp_path / "no.safetensors")],
                         "no such file")]:
        assert fd_bench([*args, "--runs", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, err


def png_pixels(png: bytes) -> np.ndarray:
    import io
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def image_pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def lora_dir(files, tmp_path_factory):
    """fd-serve --lora-dir: the kohya LoRA, a UNet-only one, and a file beside the folder that must stay out."""
    paths, factors, _ = files
    folder = tmp_path_factory.mktemp("loras")
    (folder / "style.safetensors").write_bytes(paths["kohya"].read_bytes())
    save_file(peft_file([f for f in factors if f[0] == "unet"], True), folder / "unet-only.safetensors")
    (folder.parent / "outside.safetensors").write_bytes(paths["kohya"].read_bytes())
    return folder


def test_served_requests_name_loras_from_the_lora_dir_and_batch_by_lora_set(refittable_engine, personal_engine,
                                                                            lora_dir):
    from fd.runtime.pipeline import FasterDiffusionPipeline
    from fd.serve.api import BadRequest, ImageRequest, parse_image_request
    from fd.serve.service import ImageService
    service = ImageService(str(refittable_engine), lora_dir=str(lora_dir))
    assert service.info()["loras"] == ["style.safetensors", "unet-only.safetensors"]
    vae = service.pipe.runner.sessions["vae_decoder"]
    style = [{"name": "style.safetensors", "scale": 0.8}]
    bodies = [{"prompt": "a red cube", "seed": 1}, {"prompt": "a red cube", "seed": 2, "loras": style},
              {"prompt": "a blue sphere", "seed": 3, "loras": style}, {"prompt": "a blue sphere", "seed": 4},
              {"prompt": "a house", "seed": 5, "loras": [{"name": "unet-only.safetensors", "scale": 0.5}]}]
    jobs = [service.prepare(ImageRequest.model_validate({**b, "steps": 4}).to_request()) for b in bodies]
    outcomes = service.run(jobs)
    assert [(o.status, o.batch_size) for o in outcomes] == [(200, 2), (200, 2), (200, 2), (200, 2), (200, 1)]
    # the set the pipeline had (none) ran first, then each other set once: two swaps for three sets
    assert ["lora_swap" in o.timings for o in outcomes] == [False, True, True, False, True]
    assert service.pipe.runner.sessions["vae_decoder"] is vae  # a graph no LoRA changes is never reloaded
    fused, plain = FasterDiffusionPipeline(personal_engine), FasterDiffusionPipeline(refittable_engine)
    for body, outcome in zip(bodies[:4], outcomes):
        lone = (fused if "loras" in body else plain)([body["prompt"]], steps=4, seed=body["seed"])
        assert np.abs(png_pixels(outcome.png) - image_pixels(lone)).max() <= 2, body  # fd-serve's batched-row bound
    assert np.abs(png_pixels(outcomes[1].png) - image_pixels(plain(["a red cube"], steps=4, seed=2))).max() > 2

    def refused(body: dict) -> BadRequest:
        with pytest.raises(BadRequest) as caught:
            parse_image_request(json.dumps({"prompt": "a cat", **body}).encode())
        return caught.value

    for name, words in [("../outside.safetensors", "not a plain file name"), ("/etc/passwd", "not a plain file name"),
                        (str(lora_dir / "style.safetensors"), "not a plain file name"), (".hidden.safetensors",
                                                                                        "not a plain file name"),
                        ("style.ckpt", "is not a .safetensors file"), ("", "is not a file name")]:
        error = refused({"loras": [{"name": name}]})
        assert error.status == 422 and words in error.message and "\n" not in error.message, error.message
    assert 'unknown field "loras[0].path"' in refused({"loras": [{"name": "a.safetensors", "path": "/x"}]}).message
    for body, words in [({"loras": [{"name": "missing.safetensors"}]}, "is not in the server's LoRA folder"),
                        ({"loras": [{"name": "style.safetensors", "scale": 1e400}]}, "finite")]:
        with pytest.raises((FdError, BadRequest), match=words):
            service.prepare(parse_image_request(json.dumps({"prompt": "a cat", **body}).encode()))
    with pytest.raises(FdError, match="has no LoRA folder: start fd-serve with --lora-dir"):
        ImageService(str(refittable_engine), pipeline=service.pipe).prepare(
            ImageRequest.model_validate({"prompt": "a cat", "loras": style}).to_request())
    with pytest.raises(FdError, match="--lora-dir: this engine folder was built without --refittable"):
        ImageService(str(personal_engine), lora_dir=str(lora_dir))


def test_fd_serve_refuses_a_bad_lora_dir_before_ray_starts(personal_engine, refittable_engine, tmp_path, capsys):
    pytest.importorskip("ray.serve", reason="fd-serve needs the serve extra: pip install -e '.[serve]'")
    from fd.serve.cli import main as fd_serve
    for engine, folder, words in [(refittable_engine, tmp_path / "none", "--lora-dir"),
                                  (personal_engine, tmp_path, "built without --refittable")]:
        assert fd_serve(["--engine-dir", str(engine), "--lora-dir", str(folder), "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_torch_run_time_lora_equals_the_same_lora_fused_at_build(personal_engine, files, tmp_path):
    """The torch backend copies the merged tensors into the loaded programs' parameters: no program reloads, and the
    image equals the folder with the LoRA fused at build (ONNX Runtime's: the two backends agree to float noise)."""
    from fd.runtime.pipeline import FasterDiffusionPipeline
    paths, _, _ = files
    folder = build(BuildOptions(model="tiny", backend="torch", precision="fp32", out=str(tmp_path / "torch-refit"),
                                refittable=True,
                                adaptations=Adaptations(textual_inversions=(str(paths["embedding"]),))),
                   log=lambda *_: None)
    refit = json.loads((folder / "manifest.json").read_text())["refit"]
    assert set(refit["graphs"]) == {"text_encoder", "denoiser_encoder", "denoiser_decoder"}
    fused = fd_latents(FasterDiffusionPipeline(personal_engine)).latents
    pipe = FasterDiffusionPipeline(folder)
    programs = dict(pipe.runner.modules)
    base = fd_latents(pipe).latents
    assert relative_error(base, fused) > 1e-2
    swapped = pipe.set_loras([f"{paths['kohya']}:0.8"])
    assert swapped["graphs"] == ["text_encoder", "denoiser_encoder", "denoiser_decoder"]
    # every swappable program weight is the weight fd-build fuses (the adapt step on the same components)
    at_build = make_tiny_components()
    adapt(at_build, Adaptations(loras=(f"{paths['kohya']}:0.8",)), log=lambda *_: None)
    worst = max((pipe.runner.modules[graph].get_parameter(w["name"]).detach()
                 - getattr(at_build, w["component"]).get_parameter(w["parameter"]).detach()).abs().max().item()
                for graph, record in refit["graphs"].items() for w in record["weights"])
    assert worst <= 1e-6
    assert relative_error(fd_latents(pipe).latents, fused) <= 1e-5
    assert relative_error(fd_latents(pipe, loras=[f"{paths['kohya']}:0.4"]).latents, fused) > 1e-3  # scale counts
    assert all(pipe.runner.modules[g] is p for g, p in programs.items())  # updated in place, never reloaded
    pipe.set_loras([])
    assert np.array_equal(fd_latents(pipe).latents, base)  # the base values restored exactly
