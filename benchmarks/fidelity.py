"""How close two images are: PSNR and SSIM in plain numpy (scipy is not a dependency of fd).

SSIM follows Wang et al. 2004 ("Image quality assessment: from error visibility to structural
similarity"): an 11x11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
statistics, averaged over the "valid" positions where the window lies wholly inside the image. Colour
images are scored per RGB channel and the channels averaged (not on luminance); a batch of images is
the mean over images. Equal to scikit-image's `structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=255, channel_axis=-1)`, whose reflect padding is cropped away.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels of `a` and `b`; inf when they are equal."""
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def gaussian_kernel(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-x ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def gaussian_filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D Gaussian over the first two axes, 'valid' positions only (rows, then columns)."""
    rows = sliding_window_view(image, len(kernel), axis=0) @ kernel  # window axis is appended last
    return sliding_window_view(rows, len(kernel), axis=1) @ kernel


def ssim(a, b, data_range: float = 255.0) -> float:
    """Mean SSIM of `a` and `b`: (H, W), (H, W, C) or a batch (N, H, W, C); symmetric, 1.0 iff equal."""
    a, b = _pair(a, b)
    if a.ndim == 4:
        return float(np.mean([ssim(x, y, data_range) for x, y in zip(a, b)]))
    if a.ndim not in (2, 3) or min(a.shape[:2]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels as (H, W[, C]); got {a.shape}")
    kernel = gaussian_kernel()
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2

    def blur(x):
        return gaussian_filter_valid(x, kernel)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())  # over positions and channels alike: the per-channel means, averaged


def compare(images_a, images_b, latents_a=None, latents_b=None) -> dict:
    """The figures fd-bench reports for a pair of generations (uint8 image batches, optional latents)."""
    result = {"psnr_db": psnr(images_a, images_b), "ssim": ssim(images_a, images_b),
              "ssim_on": "RGB, each channel, averaged", "max_abs_latent_diff": None}
    if latents_a is not None and latents_b is not None:
        result["max_abs_latent_diff"] = float(np.max(np.abs(np.asarray(latents_a) - np.asarray(latents_b))))
    return result


def _pair(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare images of shapes {a.shape} and {b.shape}")
    return a, b
