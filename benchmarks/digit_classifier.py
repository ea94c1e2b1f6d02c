"""The digit classifier fd-bench --quality judges images with: a small CNN trained on the real training digits.

Its accuracy on generated images is the CLIP-score analogue (does the image show the prompted digit?), and
its penultimate layer (FEATURES wide) is the feature space of FD-digits, the FID analogue. Deterministic
(seeded, one thread) and cached beside the digits model, keyed by this file's code hash.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fd.benchmarks.digits import IMAGE_SIZE, SEED, cache_root, load_split
from fd.runtime.atomic import write_atomic

FEATURES = 64
EPOCHS = 30
BATCH = 64
SHIFT = 2  # pixels of random translation in training: generated digits are not always centred as scanned ones


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def forward(self, x):
        return self.head(self.body(x))

    @torch.no_grad()
    def features_and_labels(self, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """Grey images in [0, 1] (N, 32, 32) → (penultimate features (N, FEATURES), predicted digit (N,))."""
        feats, labels = [], []
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch], np.float32))[:, None]
            f = self.body(x)
            feats.append(f.numpy())
            labels.append(self.head(f).argmax(1).numpy())
        return np.concatenate(feats).astype(np.float64), np.concatenate(labels)


def to_grey(images: np.ndarray) -> np.ndarray:
    """Generated images, uint8 (N, H, W, 3) → grey float (N, 32, 32) in [0, 1] (resized when H, W is not 32)."""
    x = torch.from_numpy(np.asarray(images, np.float32) / 255.0).mean(-1)[:, None]
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0].clamp(0, 1).numpy()


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = EPOCHS, seed: int = SEED):
    """Adam on cross-entropy with random shifts; returns the classifier in eval mode. Deterministic for `seed`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic on any machine
    try:
        torch.manual_seed(seed)
        model = DigitClassifier()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        x_all, y_all = torch.from_numpy(images)[:, None], torch.from_numpy(labels)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y_all), generator=generator)
            for start in range(0, len(order), BATCH):
                index = order[start:start + BATCH]
                loss = F.cross_entropy(model(_shift(x_all[index], generator)), y_all[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            decay.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _shift(x: torch.Tensor, generator) -> torch.Tensor:
    """Each image moved by up to SHIFT pixels in each direction (zero-padded, the dark ground)."""
    padded = F.pad(x, (SHIFT,) * 4)
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def load_classifier() -> DigitClassifier:
    """The classifier trained on the digits' training split: from the cache, or trained now (seconds)."""
    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(load_split.__code__.co_filename).read_bytes())
    digest.update(torch.__version__.encode())
    path = cache_root() / f"digit-classifier-{digest.hexdigest()[:12]}.pt"
    model = DigitClassifier()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    split = load_split()
    model = train_classifier(split.train_images, split.train_labels)
    write_atomic(path, lambda f: torch.save(model.state_dict(), f))
    return model
