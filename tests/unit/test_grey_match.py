"""The confidence notices inputs unlike the training data: class-conditional grey statistics stored in the
model and their Bhattacharyya overlap with a slice's (kintsugi_daemon/inference/grey_match.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import tifffile

from kintsugi_daemon.inference.contract import SHIPPED_MODEL, ModelSpec, Normalisation, load_model
from kintsugi_daemon.inference.grey_match import MIN_CLASS_PX, class_grey_statistics, grey_match
from kintsugi_daemon.inference.metrics import slice_metrics
from kintsugi_daemon.inference.tiling import segment
from simulator.dataset import export_dataset

CLASSES = ("pore", "active")


def _two_phase(
    rng: np.random.Generator, shift: float = 0.0, noise: float = 0.03
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    labels = np.zeros((64, 64), np.uint8)
    labels[:, 32:] = 1
    means = np.where(labels == 0, 0.2, 0.6)[None] + np.array([0.0, 0.1])[:, None, None]
    image = means + shift + rng.normal(0, noise, (2, 64, 64))
    return image.astype(np.float32), labels


def test_overlap_is_one_on_the_training_distribution_and_falls_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    stats = class_grey_statistics([_two_phase(rng) for _ in range(3)], CLASSES)
    assert set(stats) == set(CLASSES) and stats["pore"]["pixels"] == 3 * 64 * 32
    assert stats["pore"]["mean"] == pytest.approx([0.2, 0.3], abs=2e-3)
    assert stats["active"]["std"] == pytest.approx([0.03, 0.03], rel=0.05)

    same = grey_match(*_two_phase(rng), CLASSES, stats)
    assert same is not None and same > 0.99
    # a shift of one class spread (0.03) in both channels: exp(-0.03^2 / (4 * 2 * 0.03^2)) per channel
    one_sigma = grey_match(*_two_phase(rng, shift=0.03), CLASSES, stats)
    assert one_sigma == pytest.approx(np.exp(-1 / 8) ** 2, rel=0.03)
    far = grey_match(*_two_phase(rng, shift=0.15), CLASSES, stats)
    assert far is not None and far < 0.01
    # twice the noise, same means: the spreads' term alone, sqrt(2*1*2 / (1 + 4)) per channel
    noisy = grey_match(*_two_phase(rng, noise=0.06), CLASSES, stats)
    assert noisy == pytest.approx(0.8, rel=0.05)


def test_small_and_unknown_classes_do_not_count() -> None:
    rng = np.random.default_rng(1)
    image, labels = _two_phase(rng)
    stats = class_grey_statistics([(image, labels)], CLASSES)
    few = np.full_like(labels, 255)  # 255 and other values >= len(classes): no class
    few[:4, :4] = 0  # 16 pore pixels: too few for a mean and a spread
    assert MIN_CLASS_PX > 16 and grey_match(image, few, CLASSES, stats) is None
    few[:16, :16] = 0
    assert grey_match(image, few, CLASSES, stats) is not None
    assert grey_match(image, labels, CLASSES, {}) is None  # a model without statistics for them
    assert class_grey_statistics([(image, np.full_like(labels, 255))], CLASSES) == {}


def test_the_contract_checks_the_statistics() -> None:
    base = {
        "classes": list(CLASSES),
        "channels": ["cbs", "tld"],
        "normalisation": [Normalisation(mean=0.5, std=0.2)] * 2,
        "pixel_size_m": 4.05e-8,
        "tile": 256,
        "halo": 16,
        "stride": 8,
        "layout": "NCHW",
    }
    ModelSpec(**base, grey_statistics={"pore": {"mean": [0.1, 0.2], "std": [0.01, 0.02]}})
    with pytest.raises(ValueError, match=r"grey_statistics\.pore"):
        ModelSpec(**base, grey_statistics={"pore": {"mean": [0.1], "std": [0.01]}})
    with pytest.raises(ValueError, match=r"grey_statistics\.cbd"):
        ModelSpec(**base, grey_statistics={"cbd": {"mean": [0.1, 0.2], "std": [0.01, 0.02]}})


def _detector_retune(
    images: dict[str, np.ndarray], contrast: float, brightness: float
) -> dict[str, np.ndarray]:
    """grey' = (grey - 32768) * contrast + 32768 + brightness * 65535 (bench_robustness's shift)."""
    return {
        k: np.clip((v.astype(np.float64) - 32768) * contrast + 32768 + brightness * 65535, 0, 65535).astype(
            np.uint16
        )
        for k, v in images.items()
    }


def test_shipped_model_confidence_drops_when_the_greys_shift(tmp_path: Path, sim_cache: Path) -> None:
    """The issue's rule: a detector re-tune must lower the confidence; the softmax alone does not."""
    model = load_model(SHIPPED_MODEL, threads=1)
    assert model.spec.grey_statistics is not None
    assert set(model.spec.grey_statistics) == set(model.spec.classes)
    export_dataset(
        tmp_path, slices=1, seed=57, preset="94:3:3", width_px=256, height_px=192, cache_dir=sim_cache
    )
    folder = tmp_path / "with-pt"
    entry = json.loads((folder / "dataset.json").read_text())["slices"][0]
    images = {d: np.asarray(tifffile.imread(folder / f)) for d, f in entry["images"].items()}

    def metrics(imgs: dict[str, np.ndarray]) -> tuple[float, float]:
        seg = segment(model, imgs)
        m = slice_metrics(
            seg.labels,
            4.05e-8,
            max_probability=seg.max_probability,
            entropy=seg.entropy,
            grey_match=seg.grey_match,
        )
        assert m.confidence is not None and m.confidence_mean_max_probability is not None
        assert m.confidence == pytest.approx(
            m.confidence_mean_max_probability * (m.confidence_grey_match or 0)
        )
        return m.confidence, m.confidence_mean_max_probability

    conf, softmax = metrics(images)
    assert conf > 0.7, "a slice like the training data keeps a high confidence"
    for contrast, brightness in ((1.0, 0.10), (0.65, -0.10)):
        shifted, shifted_softmax = metrics(_detector_retune(images, contrast, brightness))
        assert shifted < 0.6 * conf, (contrast, brightness, shifted, conf)
        assert shifted_softmax > softmax - 0.05  # what the softmax alone would have reported
