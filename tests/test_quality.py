"""fd-bench --quality and its parts: the Fréchet distance, the digit classifier, the digits trainer, DeepCache, and
the command end to end on the untrained tiny model. The full digits model is never trained here."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fd.benchmarks import digits
from fd.benchmarks.quality import frechet_distance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A private cache folder for the classifier (trained once here, ~30 s) and any trained model."""
    folder = tmp_path_factory.mktemp("digits-cache")
    before = os.environ.get(digits.CACHE_ENV)
    os.environ[digits.CACHE_ENV] = str(folder)
    yield folder
    if before is None:
        del os.environ[digits.CACHE_ENV]
    else:
        os.environ[digits.CACHE_ENV] = before


# --- Fréchet distance -----------------------------------------------------------------------------------

def with_moments(rng, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n points whose sample mean and sample covariance (ddof 1) are exactly `mean` and `cov`."""
    x = rng.standard_normal((n, len(mean)))
    x -= x.mean(0)
    whitened = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
    return whitened @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((300, 16)) @ np.random.default_rng(1).standard_normal((16, 16))
    assert abs(frechet_distance(x, x)) < 1e-8
    assert frechet_distance(x, x + 0.1) == pytest.approx(16 * 0.01, rel=1e-6)  # a shift: only the mean term


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    from scipy.linalg import sqrtm  # an independent square root (scipy comes with scikit-learn)
    rng = np.random.default_rng(2)
    d = 6
    a_ = rng.standard_normal((d, d))
    b_ = rng.standard_normal((d, d))
    cov_a, cov_b = a_ @ a_.T + 0.5 * np.eye(d), b_ @ b_.T + 0.5 * np.eye(d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    a, b = with_moments(rng, 500, mu_a, cov_a), with_moments(rng, 700, mu_b, cov_b)
    closed = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-7)
    assert frechet_distance(b, a) == pytest.approx(closed, rel=1e-7)
    # a wrong variant (the covariance term without the cross term's square root) misses by far
    wrong = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cov_a @ cov_b)
    assert abs(wrong - closed) > 1.0


# --- the classifier -------------------------------------------------------------------------------------

def test_classifier_reaches_its_accuracy_on_the_held_out_digits(digits_cache):
    from fd.benchmarks.digit_classifier import FEATURES, load_classifier
    split = digits.load_split()
    assert len(split.held_out_labels) == 540 and len(split.train_labels) == 1257
    # the held-out digits are never in the training split (no image appears in both)
    train = {image.tobytes() for image in split.train_images}
    assert not any(image.tobytes() in train for image in split.held_out_images)
    classifier = load_classifier()
    features, predicted = classifier.features_and_labels(split.held_out_images)
    assert features.shape == (540, FEATURES)
    assert (predicted == split.held_out_labels).mean() >= 0.97
    assert list(digits_cache.glob("digit-classifier-*.pt"))  # cached: the next load reads it
    again, _ = load_classifier().features_and_labels(split.held_out_images[:20])
    np.testing.assert_array_equal(again, features[:20])


# --- the trainer ----------------------------------------------------------------------------------------

@torch.no_grad()
def unet_loss(unet, latents, embeddings, seed=123) -> float:
    """Epsilon-prediction loss on a fixed batch, noise and timesteps."""
    from diffusers import DDPMScheduler
    schedule = DDPMScheduler.from_config(digits.DDIM_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(1000, (len(latents),), generator=g)
    prediction = unet(schedule.add_noise(latents, noise, t), t, encoder_hidden_states=embeddings).sample
    return torch.nn.functional.mse_loss(prediction, noise).item()


def test_trainer_steps_lower_the_loss_and_one_seed_gives_identical_weights():
    split = digits.load_split()
    config = digits.TrainConfig(batch_size=32, unet_lr=2e-3)
    tokenizer, text_encoder, unet, vae = digits.make_untrained()
    _, _, unet_again, vae_again = digits.make_untrained()
    images = split.train_images[:64]
    pixels = digits.to_pixels(images)

    def recon_loss(model):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model.decode(model.encode(pixels).latent_dist.mean).sample,
                                                pixels).item()
    before = recon_loss(vae)
    digits.train_vae(vae, images, 8, config)
    assert recon_loss(vae) < 0.8 * before
    digits.train_vae(vae_again, images, 8, config)
    for (name, p), q in zip(vae.state_dict().items(), vae_again.state_dict().values()):
        assert torch.equal(p, q), name

    mean, std = digits.encode_latents(vae, images)
    embeddings = digits.prompt_embeddings(tokenizer, text_encoder)
    fixed = (mean[:32] / mean.std(), embeddings[torch.as_tensor(split.train_labels[:32])])
    before = unet_loss(unet, *fixed)
    ema, losses = digits.train_unet(unet, mean / mean.std(), std / mean.std(), split.train_labels[:64], embeddings,
                                    12, config)
    assert len(losses) == 12
    assert unet_loss(unet, *fixed) < 0.9 * before
    ema_again, _ = digits.train_unet(unet_again, mean / mean.std(), std / mean.std(), split.train_labels[:64],
                                     embeddings, 12, config)
    for (name, p), q in zip(ema.state_dict().items(), ema_again.state_dict().values()):
        assert torch.equal(p, q), name


def test_prompts_give_eleven_different_conditionings():
    tokenizer, text_encoder, _, _ = digits.make_untrained()
    embeddings = digits.prompt_embeddings(tokenizer, text_encoder)
    assert embeddings.shape[0] == 11
    flat = embeddings.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(11) * 1e9
    assert distances.min() > 1e-3  # every digit (and "") conditions the UNet differently


# --- DeepCache ------------------------------------------------------------------------------------------

def test_deepcache_interval_1_is_the_unet_and_a_shallow_call_reuses_the_deep_features(tiny_components):
    from fd.benchmarks.deepcache import DeepCache
    unet = tiny_components.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=context).sample
        plain_later = unet(x, 300, encoder_hidden_states=context).sample
        with DeepCache(unet, interval=1) as cache:
            assert torch.allclose(unet(x, 500, encoder_hidden_states=context).sample, plain, atol=1e-6)
        assert cache.full_calls == 1
        with DeepCache(unet, interval=3) as cache:
            full = unet(x, 500, encoder_hidden_states=context).sample
            shallow_same = unet(x, 500, encoder_hidden_states=context).sample  # same input: same deep features
            shallow_later = unet(x, 300, encoder_hidden_states=context).sample
            unet(x, 300, encoder_hidden_states=context)
        assert cache.calls == 4 and cache.full_calls == 2
        assert torch.allclose(full, plain, atol=1e-6)
        assert torch.allclose(shallow_same, plain, atol=1e-6)
        # at another timestep the reused deep features make it differ from the full UNet (it really skips)
        assert (shallow_later - plain_later).abs().max() > 1e-3
    assert "forward" not in vars(unet)  # the UNet is given back as it was


# --- fd-bench --quality end to end ----------------------------------------------------------------------

def test_fd_bench_quality_end_to_end_on_the_tiny_model(tiny_engine, digits_cache, tmp_path, capsys):
    from PIL import Image

    from fd.benchmarks.cli import main
    out, grid = tmp_path / "quality.json", tmp_path / "grid.png"
    code = main(["--engine-dir", str(tiny_engine), "--quality", "--samples-per-digit", "1",
                 "--arms", "ddim9,dpmpp20-fd,deepcache3", "--json", str(out), "--grid", str(grid)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    assert result["schema"] == "fd-bench-quality/1"
    assert list(result["arms"]) == ["ddim9", "dpmpp20-fd", "deepcache3"]
    for name, arm in result["arms"].items():
        assert arm["samples"] == 10
        for measure in ("accuracy", "fd_digits", "seconds_per_image"):
            m = arm[measure]
            assert m["low"] <= m["high"] and np.isfinite(m["value"]), (name, measure)
        assert 0 <= arm["accuracy"]["value"] <= 1 and arm["seconds_per_image"]["value"] > 0
        assert f"| {name} |" in printed
    assert result["arms"]["dpmpp20-fd"]["policy"]["key_steps"] == [0, 1, 2, 3, 5, 10, 15]  # the paper's 20-step set
    assert result["arms"]["ddim9"]["policy"]["key_steps"] == list(range(9))
    assert result["arms"]["deepcache3"]["runs_on"] == "diffusers"
    assert result["classifier"]["held_out_accuracy"]["value"] >= 0.97
    assert result["floor"]["fd_digits"]["value"] > 0
    width, height = Image.open(grid).size
    assert height == 3 * 64 + 16 and width > 10 * 64  # a row per arm under a header, ten digits each


def test_quality_refuses_speed_options_and_unknown_arms(tiny_engine, capsys):
    from fd.benchmarks.cli import main
    assert main(["--engine-dir", str(tiny_engine), "--quality", "--uniform", "4"]) == 2
    assert "--uniform does not go with --quality" in capsys.readouterr().err
    assert main(["--engine-dir", str(tiny_engine), "--quality", "--arms", "ddim9,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown arm nope" in err and err.count("\n") == 1
