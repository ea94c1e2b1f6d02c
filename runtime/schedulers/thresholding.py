"""Dynamic thresholding of the predicted clean sample (Saharia et al. 2022, "Imagen", section 2.3), as diffusers'
DDPM, DDIM and DPM-Solver++ schedulers apply it when their config sets `thresholding` (DeepFloyd IF's does).

Per image: s = the `ratio` quantile of |x0| (linear interpolation, as torch.quantile), clamped to
[1, sample_max_value]; then x0 <- clip(x0, -s, s) / s. With s = 1 it is plain clipping to [-1, 1].
"""
import numpy as np

CONFIG_KEYS = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")


def dynamic_threshold(x0: np.ndarray, ratio: float, sample_max_value: float) -> np.ndarray:
    rows = x0.reshape(len(x0), -1)
    s = np.quantile(np.abs(rows), ratio, axis=1).astype(np.float32)
    s = np.clip(s, np.float32(1.0), np.float32(sample_max_value))[:, None]
    return (np.clip(rows, -s, s) / s).reshape(x0.shape).astype(np.float32, copy=False)


def threshold_or_clip(x0: np.ndarray, cfg: dict) -> np.ndarray:
    """What diffusers' DDPM and DDIM do to x0: dynamic thresholding if configured, else clipping if configured."""
    if cfg["thresholding"]:
        return dynamic_threshold(x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
    if cfg.get("clip_sample"):
        r = np.float32(cfg["clip_sample_range"])
        return np.clip(x0, -r, r)
    return x0
