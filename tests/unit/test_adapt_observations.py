"""The per-slice image measures on images whose truth is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from kintsugi_daemon.adapt.observations import (
    fiducial_match,
    image_measures,
    noise_sigma,
    rose_ratio,
    saturation,
    segmentation_observation,
    sharpness,
    stripe_energy,
)
from kintsugi_daemon.inference.contract import CANONICAL_CLASSES
from kintsugi_daemon.inference.metrics import slice_metrics

RNG = np.random.default_rng(7)
TEXTURE = ndi.gaussian_filter(RNG.random((600, 700)), 3) * 60_000


def window(dy: float, dx: float, noise: float = 150.0) -> np.ndarray:
    """A 128 x 256 window of the texture seen with the field of view moved by (dy, dx) pixels."""
    moved = ndi.shift(TEXTURE, (-dy, -dx), order=3)
    return np.asarray(moved[200:328, 200:456] + RNG.normal(0, noise, (128, 256)))


@pytest.mark.parametrize(("dy", "dx"), [(0.0, 0.0), (3.0, -2.0), (-10.5, 7.25), (0.4, 0.0), (-25.0, 30.0)])
def test_fiducial_shift_is_recovered_to_a_fraction_of_a_pixel(dy: float, dx: float) -> None:
    m = fiducial_match(window(0, 0, noise=0), window(dy, dx))
    assert m.shift_y_px == pytest.approx(dy, abs=0.35) and m.shift_x_px == pytest.approx(dx, abs=0.35)
    assert m.score > 0.95


def test_a_lost_fiducial_scores_low() -> None:
    other = ndi.gaussian_filter(RNG.random((128, 256)), 3) * 60_000
    assert fiducial_match(window(0, 0), other).score < 0.3
    assert fiducial_match(window(0, 0), np.full((128, 256), 30_000.0)).score == 0.0  # blank: no signal
    with pytest.raises(ValueError, match="differ in shape"):
        fiducial_match(window(0, 0), window(0, 0)[:64])


def test_sharpness_falls_with_blur_not_with_brightness() -> None:
    face = TEXTURE[:256, :256]
    s = sharpness(face)
    assert sharpness(ndi.gaussian_filter(face, 2.0)) < 0.7 * s
    assert sharpness(ndi.gaussian_filter(face, 4.0)) < 0.3 * s
    assert sharpness(face * 0.5 + 1000) == pytest.approx(s, rel=1e-6)


def test_saturation_counts_the_range_ends() -> None:
    img = np.full((100, 100), 30_000, dtype=np.uint16)
    img[:5] = 65535
    img[5:7] = 0
    assert saturation(img) == pytest.approx(0.07)


def test_stripe_energy_sees_curtains_not_structure() -> None:
    face = TEXTURE[:512, :640] + RNG.normal(0, 300, (512, 640))
    spread = float(face.std())
    assert stripe_energy(face) < 0.02  # particles, edges and noise are not curtains
    curtains = RNG.normal(0, 0.1 * spread, 640)
    assert stripe_energy(face + curtains[None, :]) == pytest.approx(0.1, rel=0.3)
    layers = RNG.normal(0, 0.3 * spread, 512)
    assert stripe_energy(face + layers[:, None]) < 0.02  # bands across the face are not curtains
    assert stripe_energy(np.full((64, 64), 7.0)) == 0.0


def test_noise_and_rose_ratio() -> None:
    phases = np.repeat(np.repeat(RNG.integers(0, 3, (16, 24)), 32, axis=0), 32, axis=1)
    clean = 20_000.0 + 5_000.0 * phases
    for sigma in (200.0, 800.0):
        assert noise_sigma(clean + RNG.normal(0, sigma, clean.shape)) == pytest.approx(sigma, rel=0.1)
    assert rose_ratio(clean + RNG.normal(0, 500, clean.shape)) == pytest.approx(5_000 / (5 * 500), rel=0.15)
    assert rose_ratio(clean + RNG.normal(0, 2_000, clean.shape)) < 1.0  # phases 2.5 sigma apart: not visible
    assert rose_ratio(np.full((64, 64), 1000.0)) == 0.0


def test_image_measures_and_segmentation_observation() -> None:
    img = (TEXTURE[:128, :128]).astype(np.uint16)
    m = image_measures({"cbs": img, "tld": img})
    assert set(m.sharpness) == {"cbs", "tld"} and m.snr["cbs"] > 1
    labels = np.full((10, 10), CANONICAL_CLASSES["active"], dtype=np.uint8)
    labels[:2] = 255  # above the surface
    labels[2, :5] = CANONICAL_CLASSES["pore"]
    labels[2, 5:] = CANONICAL_CLASSES["unfilled_pore"]
    labels[9] = CANONICAL_CLASSES["collector"]
    seg = segmentation_observation(slice_metrics(labels, 40e-9))
    assert seg.outside_fraction == pytest.approx(0.2) and seg.unfilled_pore_share == pytest.approx(0.5)
    # phase fractions are of the specimen's pixels (issue 8): 10 of the 80 not outside
    assert seg.fraction_collector == pytest.approx(10 / 80) and seg.confidence is None
