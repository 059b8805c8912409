"""What the network sees per step: random crops (rare classes over-sampled), physically valid augmentation
and the soft Dice term of the loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch  # type: ignore[import-not-found, unused-ignore]
from torch import Tensor  # type: ignore[import-not-found, unused-ignore]
from torch.nn import functional as nnf  # type: ignore[import-not-found, unused-ignore]

from kintsugi_daemon.inference.training.data import FloatArray, SliceData

__all__ = ["CropSampler", "augment", "dice_loss"]


class CropSampler:
    """Random crops from the training part (columns left of the validation strip) of every slice.

    Crops may reach `pad` pixels past the image edges into a reflect-padded margin, because that is what
    the tiler feeds at the borders (it reflect-pads by the halo): a model that never saw a reflected edge
    in training mistakes the doubled collector band at the bottom for an NMC particle.
    A fraction `rare_fraction` of the crops is centred on a pixel of a class drawn uniformly among the
    classes present, so rare classes (unfilled pores with Pt, but what decides a re-deposition) are seen
    in most batches; the rest are uniform over the area.
    """

    def __init__(
        self,
        slices: Sequence[SliceData],
        split_cols: Sequence[int],
        crop: int,
        stride: int,
        seed: int,
        n_classes: int,
        rare_fraction: float = 0.0,
        pad: int = 0,
    ):
        self.split = split_cols
        h_min = min(s.image.shape[1] for s in slices)
        w_min = min(split_cols)
        self.crop = max(stride, min(crop, h_min, w_min) // stride * stride)
        self.pad = min(pad, h_min - 1, w_min - 1)
        p = self.pad
        self.images = [np.pad(s.image, ((0, 0), (p, p), (p, p)), mode="reflect") for s in slices]
        self.labels = [np.pad(s.labels, p, mode="reflect") for s in slices]
        # a crop's right edge stays left of the validation strip; with no strip it may enter the margin
        self.right = [
            c + (p if c == s.image.shape[2] else 0) for s, c in zip(slices, split_cols, strict=True)
        ]
        areas = np.array(
            [im.shape[1] * r for im, r in zip(self.images, self.right, strict=True)], dtype=float
        )
        self.p = areas / areas.sum()
        self.rng = np.random.default_rng(seed)
        self.rare_fraction = rare_fraction
        # per class: (slice index, row, col) in padded coordinates of up to 4096 pixels per slice
        self.where: list[npt.NDArray[np.int64]] = []
        if rare_fraction > 0:
            pick = np.random.default_rng(seed + 7)
            for k in range(n_classes):
                found = []
                for i, (sl, col) in enumerate(zip(slices, split_cols, strict=True)):
                    rows, cols = np.nonzero(sl.labels[:, :col] == k)
                    if rows.size:
                        sel = pick.choice(rows.size, min(rows.size, 4096), replace=False)
                        found.append(np.stack([np.full(sel.size, i), rows[sel] + p, cols[sel] + p], axis=1))
                if found:
                    self.where.append(np.concatenate(found))

    def batch(self, n: int) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        c = self.crop
        xs = np.empty((n, self.images[0].shape[0], c, c), dtype=np.float32)
        ys = np.empty((n, c, c), dtype=np.int64)
        for i in range(n):
            if self.where and self.rng.random() < self.rare_fraction:
                pool = self.where[int(self.rng.integers(len(self.where)))]
                k, r, q = (int(v) for v in pool[int(self.rng.integers(len(pool)))])
                top = min(max(r - c // 2, 0), self.images[k].shape[1] - c)
                left = min(max(q - c // 2, 0), self.pad + self.right[k] - c)
            else:
                k = int(self.rng.choice(len(self.images), p=self.p))
                top = int(self.rng.integers(0, self.images[k].shape[1] - c + 1))
                left = int(self.rng.integers(0, self.pad + self.right[k] - c + 1))
            xs[i] = self.images[k][:, top : top + c, left : left + c]
            ys[i] = self.labels[k][top : top + c, left : left + c]
        return xs, ys


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def augment(
    x: Tensor, y: Tensor, gen: torch.Generator, field_gen: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Physically valid augmentations on raw [0,1] grey values: x-flips, per-channel gamma, contrast,
    brightness, probe blur, curtaining stripes and Gaussian noise. No y-flips or rotations (gravity, the
    52 deg foreshortening and the milling direction are not symmetric).

    Runs on x's device: the per-crop parameters come from `gen` (CPU), the per-pixel noise field from
    `field_gen`, a generator on x's device (default `gen`, for CPU tensors). On a GPU this keeps the
    augmentation off the CPU, which would otherwise take longer than the training step."""
    n, c, h, w = x.shape
    dev = x.device

    def uniform(shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
        return _uniform(gen, shape, lo, hi).to(dev)

    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None], y.flip(-1), y)
    # blur: a focus or probe change between sessions (sigma 0..1.2 px, a 5-tap separable kernel)
    sigma = uniform((n, 1, 1), 0.05, 1.2)
    taps = torch.arange(-2, 3, dtype=torch.float32, device=dev).view(1, 1, 5)
    k = torch.exp(-0.5 * (taps / sigma) ** 2)
    k = (k / k.sum(-1, keepdim=True)).repeat_interleave(c, 0).unsqueeze(2)  # (n*c, 1, 1, 5)
    flat = x.reshape(1, n * c, h, w)
    flat = nnf.conv2d(nnf.pad(flat, (2, 2, 0, 0), mode="replicate"), k, groups=n * c)
    flat = nnf.conv2d(nnf.pad(flat, (0, 0, 2, 2), mode="replicate"), k.transpose(2, 3), groups=n * c)
    x = flat.reshape(n, c, h, w)
    gamma = torch.exp(uniform((n, c, 1, 1), -0.3, 0.3))
    x = x.clamp(0.0, 1.0) ** gamma
    # A detector re-tune is an affine grey map (gain and offset). Its pivot is the crop's mean half the
    # time (an auto-contrast keeps the mean level) and mid-grey otherwise (a manual contrast knob), with
    # gain x0.6-1.6 (log-uniform) and offset +-0.12 of full scale: wide enough that the robustness
    # benchmark's +-10 % brightness and -35 %/+50 % contrast lie inside what training saw.
    at_mean = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).to(dev)
    pivot = torch.where(at_mean, x.mean(dim=(2, 3), keepdim=True), torch.tensor(0.5, device=dev))
    contrast = torch.exp(uniform((n, c, 1, 1), math.log(0.6), math.log(1.6)))
    bright = uniform((n, c, 1, 1), -0.12, 0.12)
    x = (x - pivot) * contrast + pivot + bright
    # curtaining: multiplicative vertical stripes of a few percent, 0.2-2 um wide (5-50 px)
    stripes = torch.randn(n, 1, 1, w // 4 + 2, generator=gen).to(dev)
    stripes = nnf.interpolate(stripes, size=(1, w), mode="bilinear", align_corners=False)
    amp = uniform((n, 1, 1, 1), 0.0, 0.06) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).to(dev)
    x = x * (1.0 + amp * stripes)
    noise = uniform((n, 1, 1, 1), 0.0, 0.03)
    x = x + torch.randn(x.shape, generator=field_gen or gen, device=dev) * noise
    return x.clamp(0.0, 1.0), y  # a detector's output saturates at its range, as the 16-bit images do


def dice_loss(logits: Tensor, target: Tensor, n_classes: int) -> Tensor:
    valid = (target < n_classes).unsqueeze(1)
    probs = logits.softmax(dim=1) * valid
    onehot = nnf.one_hot(target.clamp(max=n_classes - 1), n_classes).permute(0, 3, 1, 2) * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice: Tensor = 1.0 - ((2.0 * inter + 1.0) / (denom + 1.0)).mean()
    return dice
