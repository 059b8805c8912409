"""Inference: the ONNX model contract, tiled inference, slice metrics and `kintsugi segment`.

Models are tiny real ONNX graphs built here with onnx.helper; the data is a real simulator export.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tifffile
from onnx import TensorProto, helper, numpy_helper

from kintsugi_daemon.inference.contract import (
    CANONICAL_CLASSES,
    OUTSIDE_LABEL,
    SHIPPED_MODEL,
    ModelLoadError,
    ModelMismatch,
    ModelSpec,
    check_against_recipe,
    load_model,
)
from kintsugi_daemon.inference.metrics import (
    iou_per_class,
    mean_iou,
    slice_metrics,
)
from kintsugi_daemon.inference.overlay import overlay, save_overlay
from kintsugi_daemon.inference.session import available_cpus
from kintsugi_daemon.inference.tiling import (
    DEFAULT_ACTIVATION_BYTES_PER_PX,
    plan_tiles,
    segment,
    segment_async,
)
from tests.support.onnx_models import CLASSES, PX, build_threshold_model, save, spec_dict


def _conv(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    x: str,
    cin: int,
    cout: int,
    rng: np.random.Generator,
    name: str,
    relu: bool = True,
) -> str:
    w = (rng.standard_normal((cout, cin, 3, 3)) / math.sqrt(9 * cin)).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_y"], pads=[1, 1, 1, 1]))
    if not relu:
        return f"{name}_y"
    nodes.append(helper.make_node("Relu", [f"{name}_y"], [f"{name}_r"]))
    return f"{name}_r"


def build_unet(
    path: Path,
    *,
    metadata: dict[str, Any] | None,
    layout: str = "NCHW",
    channels: int = 2,
    classes: int = 5,
    input_shape: Sequence[int | str] | None = None,
    seed: int = 0,
) -> Path:
    """A two-level conv/pool/upsample net (stride 4, receptive-field radius < 24 px), random weights."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
        x = "x_nchw"
    a = _conv(nodes, inits, x, channels, 8, rng, "c1")
    a = _conv(nodes, inits, a, 8, 8, rng, "c2")
    nodes.append(helper.make_node("MaxPool", [a], ["p1"], kernel_shape=[2, 2], strides=[2, 2]))
    b = _conv(nodes, inits, "p1", 8, 8, rng, "c3")
    nodes.append(helper.make_node("AveragePool", [b], ["p2"], kernel_shape=[2, 2], strides=[2, 2]))
    c = _conv(nodes, inits, "p2", 8, 8, rng, "c4")
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes.append(helper.make_node("Resize", [c, "", "scales"], ["u1"], mode="nearest"))
    nodes.append(helper.make_node("Add", ["u1", b], ["s1"]))  # a skip connection, as in a U-Net
    d = _conv(nodes, inits, "s1", 8, 8, rng, "c5")
    nodes.append(helper.make_node("Resize", [d, "", "scales"], ["u2"], mode="nearest"))
    nodes.append(helper.make_node("Add", ["u2", a], ["s2"]))
    y = _conv(nodes, inits, "s2", 8, classes, rng, "c6", relu=False)
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [y], ["logits"], perm=[0, 2, 3, 1]))
    else:
        nodes.append(helper.make_node("Identity", [y], ["logits"]))
    if input_shape is None:
        input_shape = ["N", channels, "H", "W"] if layout == "NCHW" else ["N", "H", "W", channels]
    out_shape: list[int | str] = ["N", classes, "H", "W"] if layout == "NCHW" else ["N", "H", "W", classes]
    graph = helper.make_graph(
        nodes,
        "tiny-unet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    return save(graph, path, metadata)


def random_images(shape: tuple[int, int], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Smooth-ish structure plus noise, so the net's outputs vary across the image like real slices.
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 30000 + 20000 * np.sin(yy / 7.0) * np.cos(xx / 11.0)
    return {
        name: np.clip(base + rng.normal(0, 6000, shape) * (i + 1), 0, 65535).astype(np.uint16)
        for i, name in enumerate(("cbs", "tld"))
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return np.asarray(e / e.sum(axis=0, keepdims=True))


@pytest.fixture
def unet(tmp_path: Path) -> Path:
    return build_unet(tmp_path / "unet.onnx", metadata=spec_dict())


# ------------------------------------------------------------------------------------- the contract


def test_metadata_round_trip(tmp_path: Path) -> None:
    spec = ModelSpec.model_validate(spec_dict(halo=22))
    props = spec.to_metadata()
    assert props["kintsugi.classes"] == json.dumps(CLASSES)
    path = build_unet(
        tmp_path / "m.onnx", metadata={k.removeprefix("kintsugi."): json.loads(v) for k, v in props.items()}
    )
    model = load_model(path)
    assert model.spec == spec
    assert model.spec.effective_halo == 24  # rounded up to the stride of 4
    assert model.tile_hw == (96, 96) and not model.fixed_shape and model.max_batch is None
    # Props of other tools and newer contract fields are ignored rather than refused.
    onnx_model = onnx.load(str(path))
    helper.set_model_props(onnx_model, {**props, "kintsugi.future_field": "1", "avizo.thing": "x"})
    onnx.save(onnx_model, str(path))
    assert load_model(path).spec == spec


def test_model_without_metadata_needs_an_override(tmp_path: Path) -> None:
    path = build_unet(tmp_path / "avizo.onnx", metadata=None)
    with pytest.raises(ModelLoadError, match=r"lacks kintsugi\.classes, kintsugi\.channels") as err:
        load_model(path)
    assert "override" in str(err.value)
    assert load_model(path, override=spec_dict()).spec == ModelSpec.model_validate(spec_dict())
    spec = ModelSpec.model_validate(spec_dict(layout="NCHW"))
    assert load_model(path, override=spec).spec == spec


def test_partial_metadata_is_merged_with_the_override(tmp_path: Path) -> None:
    meta = spec_dict()
    del meta["halo"], meta["stride"], meta["training"], meta["version"]
    path = build_unet(tmp_path / "partial.onnx", metadata=meta)
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "kintsugi.halo, kintsugi.stride" in str(err.value) and "kintsugi.classes" not in str(err.value)
    model = load_model(path, override={"halo": 24, "kintsugi.stride": 4, "tile": 128})
    assert (model.spec.halo, model.spec.stride, model.spec.tile) == (24, 4, 128)  # the override wins
    assert model.spec.version == "unspecified" and model.spec.training == {}
    with pytest.raises(ModelLoadError, match="halo_px"):
        load_model(path, override={"halo_px": 24, "stride": 4})  # a typo in the recipe is named


def _rank3_model(path: Path) -> Path:
    node = helper.make_node("Identity", ["x"], ["logits"])
    graph = helper.make_graph(
        [node],
        "rank3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, "H", "W"])],
    )
    return save(graph, path, spec_dict())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"model file .*nothing\.onnx does not exist"),
        ("corrupt", r"is not a readable ONNX model"),
        ("rank3", r"input 'x' has rank 3"),
        ("nan", r"kintsugi\.normalisation\.0\.mean: Input should be a finite number"),
        ("unknown_class", r"unknown class name\(s\) \['pores'\]; canonical names are"),
        ("channels", r"3 channels on the NCHW channel axis but the metadata declares 2 \(cbs, tld\)"),
        ("classes", r"output 'logits' .* 5 channels .* declares 4"),
        ("layout", r"the graph looks NCHW: check kintsugi.layout"),
        ("json", r"metadata kintsugi\.tile is not valid JSON"),
        ("norm_count", r"normalisation has 1 entries for 2 channels"),
        ("stride", r"tile 90 is not a multiple of stride 4"),
        ("halo", r"tile 48 leaves no centre inside a halo of 24"),
    ],
)
def test_load_errors_are_clear(tmp_path: Path, case: str, message: str) -> None:  # noqa: C901 - one case per bad model, built inline
    path = tmp_path / f"{case}.onnx"
    if case == "missing":
        path = tmp_path / "nothing.onnx"
    elif case == "corrupt":
        path.write_bytes(b"\x08\x07not really a protobuf" * 10)
    elif case == "rank3":
        _rank3_model(path)
    elif case == "nan":
        build_unet(path, metadata=spec_dict(normalisation=[{"mean": math.nan, "std": 1.0}] * 2))
    elif case == "unknown_class":
        build_unet(path, metadata=spec_dict(classes=["pores", "unfilled_pore", "active", "cbd", "collector"]))
    elif case == "channels":
        build_unet(path, metadata=spec_dict(), channels=3)
    elif case == "classes":
        build_unet(path, metadata=spec_dict(classes=["pore", "active", "cbd", "collector"]))
    elif case == "layout":
        build_unet(path, metadata=spec_dict(layout="NHWC"), input_shape=["N", 2, 96, 96])
    elif case == "json":
        build_unet(path, metadata=spec_dict())
        m = onnx.load(str(path))
        helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, "kintsugi.tile": "[96"})
        onnx.save(m, str(path))
    elif case == "norm_count":
        build_unet(path, metadata=spec_dict(normalisation=[{"mean": 0.0, "std": 1.0}]))
    elif case == "stride":
        build_unet(path, metadata=spec_dict(tile=90))
    elif case == "halo":
        build_unet(path, metadata=spec_dict(tile=48))
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_check_against_recipe() -> None:
    spec = ModelSpec.model_validate(spec_dict())
    # Order and extra detectors do not matter: channels are mapped by name.
    check_against_recipe(spec, ["TLD", "cbs", "ice"], ["pore", "unfilled_pore"], 4.4e-8)
    check_against_recipe(spec, ["cbs", "tld"], [], None)
    with pytest.raises(ModelMismatch, match=r"needs detector\(s\) tld which the run does not image"):
        check_against_recipe(spec, ["cbs", "etd"], [], PX)
    narrow = ModelSpec.model_validate(spec_dict(classes=["pore", "active", "cbd", "collector"]))
    with pytest.raises(ModelMismatch, match=r"needs class\(es\) unfilled_pore which the model does not"):
        check_against_recipe(narrow, ["cbs", "tld"], ["unfilled_pore"], PX)
    with pytest.raises(
        ModelMismatch, match=r"run pixel size 50\.6 nm differs from the model's 40\.5 nm by 25%"
    ):
        check_against_recipe(spec, ["cbs", "tld"], [], PX * 1.25)
    with pytest.raises(ModelMismatch) as err:
        check_against_recipe(narrow, ["se"], ["unfilled_pore"], PX / 2)
    assert len(err.value.problems) == 3  # every difference at once, not one per attempt


def test_session_options_are_deliberate(unet: Path) -> None:
    model = load_model(unet, threads=3)
    opts = model.session.get_session_options()
    assert opts.intra_op_num_threads == 3
    assert opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert opts.execution_mode.name == "ORT_SEQUENTIAL"
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    default = load_model(unet).session.get_session_options()
    assert default.intra_op_num_threads == available_cpus() == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        load_model(unet, threads=0)


# ------------------------------------------------------------------------------------------- tiling


def whole_image_probabilities(model_path: Path, images: dict[str, np.ndarray], stride: int = 4) -> np.ndarray:
    """The reference: the whole image through the network in one piece (padded to the stride)."""
    model = load_model(model_path)
    from kintsugi_daemon.inference.tiling import normalise

    x = normalise(model, images)
    h, w = x.shape[1:]
    xp = np.pad(x, ((0, 0), (0, -h % stride), (0, -w % stride)), mode="reflect")
    return softmax(model.run(xp[None])[0][:, :h, :w])


# A budget that admits only ~96 x 96 px tiles (the tiler's default per-pixel cost): forces a grid.
SMALL_TILES = 96 * 96 * DEFAULT_ACTIVATION_BYTES_PER_PX


def test_tiled_inference_is_seamless(unet: Path) -> None:
    images = random_images((203, 250))
    model = load_model(unet)
    assert plan_tiles(model, 203, 250, memory_budget_bytes=SMALL_TILES).tiles >= 12
    seg = segment(model, images, keep_probabilities=True, batch_size=3, memory_budget_bytes=SMALL_TILES)
    ref = whole_image_probabilities(unet, images)
    assert seg.probabilities is not None
    halo = model.spec.effective_halo
    inner = (slice(None), slice(halo, -halo), slice(halo, -halo))
    # A grid of small centres: any seam would show here.
    assert np.abs(seg.probabilities[inner] - ref[inner]).max() < 1e-5
    labels_ref = np.array([CANONICAL_CLASSES[c] for c in CLASSES], np.uint8)[ref.argmax(axis=0)]
    assert np.array_equal(seg.labels[inner[1:]], labels_ref[inner[1:]])
    np.testing.assert_allclose(seg.max_probability, seg.probabilities.max(axis=0), rtol=1e-6)
    # The summaries are computed without a softmax pass: they must still be the softmax's.
    probs = seg.probabilities
    entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=0) / np.log(len(CLASSES))
    np.testing.assert_allclose(seg.entropy, entropy, atol=1e-5)
    assert np.array_equal(
        seg.labels, np.array([CANONICAL_CLASSES[c] for c in CLASSES], np.uint8)[probs.argmax(0)]
    )
    # The test can see seams: without the halo, tile edges lack context and the results differ.
    no_halo = segment(
        load_model(unet, override={"halo": 0}),
        images,
        keep_probabilities=True,
        memory_budget_bytes=SMALL_TILES,
    )
    assert no_halo.probabilities is not None
    assert np.abs(no_halo.probabilities[inner] - ref[inner]).max() > 1e-2


def test_post_processing_in_threaded_bands_equals_one_pass(unet: Path) -> None:
    """The summaries of one big tile are computed in row bands on the session's threads: the bands must
    add up to exactly what one pass gives, and to the softmax of a whole-image call."""
    images = random_images((203, 250))
    one = segment(load_model(unet, threads=1), images, keep_probabilities=True)
    banded_model = load_model(unet, threads=3)
    assert banded_model.threads == 3 and plan_tiles(banded_model, 203, 250).tiles == 1
    banded = segment(banded_model, images, keep_probabilities=True)
    assert banded.probabilities is not None and one.probabilities is not None
    assert np.array_equal(banded.labels, one.labels)
    np.testing.assert_allclose(banded.max_probability, one.max_probability, rtol=1e-6)
    np.testing.assert_allclose(banded.entropy, one.entropy, atol=1e-6)
    halo = banded_model.spec.effective_halo
    inner = (slice(None), slice(halo, -halo), slice(halo, -halo))  # the reference pads its borders otherwise
    ref = whole_image_probabilities(unet, images)
    np.testing.assert_allclose(banded.probabilities[inner], ref[inner], atol=1e-5)


@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 9), (5, 3), (37, 61), (96, 96), (97, 49), (300, 7), (143, 144)]
)
def test_odd_and_small_sizes(unet: Path, shape: tuple[int, int]) -> None:
    seg = segment(load_model(unet), random_images(shape))
    assert seg.labels.shape == seg.max_probability.shape == seg.entropy.shape == shape
    assert seg.labels.dtype == np.uint8 and set(np.unique(seg.labels)) <= set(CANONICAL_CLASSES.values())
    assert seg.max_probability.dtype == np.float32 and seg.entropy.dtype == np.float32
    assert (seg.max_probability >= 1 / 5 - 1e-6).all() and (seg.max_probability <= 1 + 1e-6).all()
    assert (seg.entropy >= 0).all() and (seg.entropy <= 1).all()
    assert seg.probabilities is None  # not kept unless asked for


def test_tile_plan_follows_frame_and_budget() -> None:
    """The shipped model on a 1536 x 1024 frame: <= 1.2x the frame's pixels through the network by
    default (one tile), a seamless grid when the budget is tight, and a clear error for no budget."""
    model = load_model(SHIPPED_MODEL, threads=1)
    roomy = plan_tiles(model, 1024, 1536)
    assert roomy.tiles == 1 and roomy.overhead(1024, 1536) <= 1.2
    per_px = model.spec.activation_bytes_per_px or DEFAULT_ACTIVATION_BYTES_PER_PX
    tight = plan_tiles(model, 1024, 1536, memory_budget_bytes=600 * 600 * per_px)
    assert tight.tiles > 1 and tight.y.tile * tight.x.tile <= 600 * 600
    assert tight.overhead(1024, 1536) < 2.0  # still better than the nominal 512 px tiles
    for axis in (tight.y, tight.x):
        assert axis.tile % model.spec.stride == 0 and all(s % model.spec.stride == 0 for s in axis.starts)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        plan_tiles(model, 1024, 1536, memory_budget_bytes=0)


def test_small_image_matches_whole_image(unet: Path) -> None:
    images = random_images((70, 90))  # smaller than one 96-px tile's centre with its halo
    seg = segment(load_model(unet), images, keep_probabilities=True)
    ref = whole_image_probabilities(unet, images)
    assert seg.probabilities is not None
    assert np.abs(seg.probabilities[:, 24:-24, 24:-24] - ref[:, 24:-24, 24:-24]).max() < 1e-5


def test_nhwc_and_fixed_shape_models_give_the_same_result(tmp_path: Path, unet: Path) -> None:
    images = random_images((150, 131), seed=4)
    nchw = segment(load_model(unet), images, keep_probabilities=True)
    nhwc_path = build_unet(tmp_path / "nhwc.onnx", metadata=spec_dict(layout="NHWC"), layout="NHWC")
    nhwc = segment(load_model(nhwc_path), images, keep_probabilities=True)
    assert nchw.probabilities is not None and nhwc.probabilities is not None
    assert np.abs(nchw.probabilities - nhwc.probabilities).max() < 1e-5
    # An Avizo-style export: fixed 1 x 2 x 64 x 64 input; the tiler must feed exactly that.
    fixed_path = build_unet(tmp_path / "fixed.onnx", metadata=spec_dict(), input_shape=[1, 2, 64, 64])
    fixed_model = load_model(fixed_path)
    assert fixed_model.tile_hw == (64, 64) and fixed_model.fixed_shape and fixed_model.max_batch == 1
    fixed = segment(fixed_model, images, keep_probabilities=True)
    assert fixed.probabilities is not None
    inner = (slice(None), slice(24, -24), slice(24, -24))
    assert np.abs(fixed.probabilities[inner] - nchw.probabilities[inner]).max() < 1e-5
    small = segment(fixed_model, random_images((20, 30)))  # padded up to the fixed tile
    assert small.labels.shape == (20, 30)


async def test_segment_async_runs_off_the_loop(unet: Path) -> None:
    model = load_model(unet)
    images = random_images((64, 80))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    result = await segment_async(model, images)
    task.cancel()
    assert np.array_equal(result.labels, segment(model, images).labels)
    assert ticks > 0


def test_images_are_mapped_by_detector_name(unet: Path) -> None:
    model = load_model(unet)
    images = random_images((40, 40))
    a = segment(model, images)
    b = segment(model, {"TLD": images["tld"], "CBS": images["cbs"], "etd": images["cbs"]})
    assert np.array_equal(a.labels, b.labels)
    with pytest.raises(ModelMismatch, match=r"needs detector image\(s\) tld; given: cbs"):
        segment(model, {"cbs": images["cbs"]})
    with pytest.raises(ValueError, match="one shape"):
        segment(model, {"cbs": images["cbs"], "tld": images["tld"][:30]})


# ------------------------------------------------------------------------------------------ metrics

P, U, A, C, K = (CANONICAL_CLASSES[n] for n in CLASSES)  # pore, unfilled, active, cbd, collector


def test_phase_fractions_and_undefined_values() -> None:
    labels = np.full((100, 100), C, np.uint8)
    labels[:20] = K  # 20% collector
    labels[20:40, :50] = P  # 10% Pt-filled pore
    labels[20:40, 50:] = U  # 10% unfilled
    labels[40:70] = A  # 30% NMC
    m = slice_metrics(labels, PX)
    assert (m.fraction_collector, m.fraction_pore, m.fraction_unfilled_pore) == (0.2, 0.1, 0.1)
    assert (m.fraction_active, m.fraction_cbd) == (0.3, 0.3)
    assert m.porosity == pytest.approx(0.2)
    assert m.electrode_porosity == pytest.approx(0.25)
    assert m.unfilled_pore_share == pytest.approx(0.5)
    assert m.confidence_mean_max_probability is None and "confidence_mean_entropy" in m.undefined
    all_cbd = slice_metrics(np.full((10, 10), C, np.uint8), PX)
    assert all_cbd.cbd_coverage is None and all_cbd.unfilled_pore_share is None
    assert set(all_cbd.undefined) >= {"cbd_coverage", "unfilled_pore_share"}
    json.dumps(all_cbd.model_dump(), allow_nan=False)  # valid JSON for MQTT: no NaN anywhere
    flat = all_cbd.numeric()
    assert "cbd_coverage" not in flat and flat["fraction_cbd"] == 1.0
    all_collector = slice_metrics(np.full((10, 10), K, np.uint8), PX)
    assert all_collector.electrode_porosity is None


def test_confidence_and_fractions_leave_the_outside_out() -> None:
    """A window labelled outside (the drift fiducial's mark) counts for no phase and no confidence."""
    labels = np.full((100, 100), A, np.uint8)
    labels[:, 50:] = P
    labels[:20, :40] = OUTSIDE_LABEL  # the mark: Pt-C and trenches, where the model is unsure
    p_max = np.full((100, 100), 0.9, np.float32)
    p_max[:20, :40] = 0.3
    entropy = np.full((100, 100), 0.1, np.float32)
    entropy[:20, :40] = 0.9
    m = slice_metrics(labels, PX, max_probability=p_max, entropy=entropy)
    assert m.confidence_mean_max_probability == pytest.approx(0.9)
    assert m.confidence_mean_entropy == pytest.approx(0.1)
    assert m.fraction_outside == pytest.approx(0.08)
    assert m.fraction_pore == pytest.approx(50 / 92) and m.fraction_active == pytest.approx(42 / 92)


def test_interface_lengths() -> None:
    yy, xx = np.mgrid[:240, :240]
    labels = np.full((240, 240), C, np.uint8)
    r = 80
    labels[(yy - 120) ** 2 + (xx - 120) ** 2 <= r**2] = A  # a disc of NMC in CBD
    m = slice_metrics(labels, PX)
    px_um = PX * 1e6
    area_um2 = 240 * 240 * px_um**2
    perimeter_um = 2 * math.pi * r * px_um
    assert m.active_perimeter_um_inv == pytest.approx(perimeter_um / area_um2, rel=0.02)
    assert m.interface_active_cbd_um_inv == m.active_perimeter_um_inv
    assert m.cbd_coverage == 1.0 and m.interface_active_pore_um_inv == 0.0
    # Right half of the disc in pore instead: coverage halves; straight boundaries are within 5%.
    labels[:, 120:][labels[:, 120:] == C] = P
    m = slice_metrics(labels, PX)
    assert m.cbd_coverage == pytest.approx(0.5, abs=0.02)
    half = np.full((100, 100), A, np.uint8)
    half[:, 50:] = P
    assert slice_metrics(half, PX).interface_active_pore_um_inv == pytest.approx(
        100 * px_um / (100 * 100 * px_um**2), rel=0.06
    )


def _particle_with_cracks() -> np.ndarray:
    yy, xx = np.mgrid[:200, :200]
    labels = np.full((200, 200), C, np.uint8)
    labels[(yy - 100) ** 2 + (xx - 100) ** 2 <= 60**2] = A
    labels[98:101, 70:130] = P  # a closed 3-px crack reached by Pt (120 nm x 2.4 um)
    labels[60:62, 80:120] = U  # a closed 2-px empty crack
    labels[120:123, 130:161] = C  # a crack open to the particle surface, filled with binder
    labels[(yy - 135) ** 2 + (xx - 85) ** 2 <= 36] = U  # a round internal void: not a crack
    return labels


def test_cracks_found_and_classified() -> None:
    m = slice_metrics(_particle_with_cracks(), PX)
    assert (m.cracks, m.cracks_pt_filled, m.cracks_cbd_filled, m.cracks_empty) == (3, 1, 1, 1)
    assert m.crack_length_um == pytest.approx((60 + 40 + 26) * PX * 1e6, rel=0.1)
    # Two separate particles with a narrow gap between them: a gap, not a crack.
    gap = np.full((100, 200), P, np.uint8)
    gap[20:80, 20:99] = A
    gap[20:80, 102:180] = A
    assert slice_metrics(gap, PX).cracks == 0
    # The heuristic is in physical units: at 4x coarser pixels the 3-px crack is ~0.5 um wide, too wide.
    assert slice_metrics(_particle_with_cracks(), PX * 4).cracks_pt_filled == 0


def test_confidence_from_probability_maps(unet: Path) -> None:
    seg = segment(load_model(unet), random_images((50, 60)))
    m = slice_metrics(seg.labels, PX, max_probability=seg.max_probability, entropy=seg.entropy)
    assert m.confidence_mean_max_probability == pytest.approx(float(seg.max_probability.mean()))
    assert m.confidence_mean_entropy is not None and 0 < m.confidence_mean_entropy < 1
    # a model without grey statistics: the confidence is the softmax alone, and the metrics say why
    assert seg.grey_match is None and m.confidence == m.confidence_mean_max_probability
    assert m.undefined == {"confidence_grey_match": "the model carries no grey statistics"}


def test_iou_per_class() -> None:
    truth = np.array([[P, P, A, A], [C, C, K, K]], np.uint8)
    pred = np.array([[P, A, A, A], [C, P, K, K]], np.uint8)
    ious = iou_per_class(pred, truth, CLASSES)
    assert ious == {"pore": 1 / 3, "unfilled_pore": None, "active": 2 / 3, "cbd": 1 / 2, "collector": 1.0}
    assert mean_iou(ious) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2 + 1) / 4)
    assert mean_iou({"pore": None}) is None
    # A manifest's own values work the same way.
    assert iou_per_class(pred + 10, truth + 10, {"pore": P + 10, "collector": K + 10}) == {
        "pore": 1 / 3,
        "collector": 1.0,
    }
    with pytest.raises(ValueError, match="differ in shape"):
        iou_per_class(pred, truth[:1], CLASSES)


def test_overlay_preview(tmp_path: Path) -> None:
    labels = _particle_with_cracks()
    image = np.random.default_rng(0).integers(0, 65535, labels.shape).astype(np.uint16)
    rgb = overlay(image, labels)
    assert rgb.shape == (*labels.shape, 3) and rgb.dtype == np.uint8
    # NMC pixels lean blue, Pt-filled pore pixels gold.
    assert rgb[labels == A][:, 2].mean() > rgb[labels == A][:, 0].mean()
    assert rgb[labels == P][:, 0].mean() > rgb[labels == P][:, 2].mean()
    save_overlay(tmp_path / "preview.png", rgb)
    from skimage import io as skio

    assert np.array_equal(skio.imread(tmp_path / "preview.png"), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]


# ------------------------------------------------------------------------------------ kintsugi segment

# CBS grey / 65535 per class at auto C/B under the simulator's physics (tilt-law yields at the face).
CBS_CENTRES = {"pore": 0.90, "unfilled_pore": 0.05, "active": 0.54, "cbd": 0.21, "collector": 0.41}


def kintsugi(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_segment_cli_on_a_dataset(tmp_path: Path, sim_dataset: Path) -> None:
    model = build_threshold_model(tmp_path / "thr.onnx", CBS_CENTRES)
    out = tmp_path / "labels"
    proc = kintsugi("segment", "--model", model, sim_dataset, "--out", out, "--overlay", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((sim_dataset / "dataset.json").read_text())
    for s in manifest["slices"]:
        labels = tifffile.imread(out / s["labels"])
        truth = tifffile.imread(sim_dataset / s["labels"])
        assert labels.dtype == np.uint8 and labels.shape == truth.shape
        assert set(np.unique(labels)) <= set(manifest["classes"].values())
        assert (out / (Path(s["labels"]).stem + "_overlay.png")).is_file()
    assert proc.stderr.count("kintsugi segment: ") == 3 and "3/3 slice 2" in proc.stderr  # progress
    for name in CLASSES:
        assert f"  {name}" in proc.stdout
    summary = json.loads((out / "segment.json").read_text())
    assert summary["mean_iou"] > 0.6 and f"mean IoU       {summary['mean_iou']:.4f}" in proc.stdout
    assert abs(summary["porosity_error"]) < 0.05 and "porosity" in proc.stdout
    assert summary["slices"][0]["metrics"]["confidence_mean_max_probability"] > 0.2


def test_segment_cli_on_detector_images(tmp_path: Path, sim_dataset: Path) -> None:
    model = build_threshold_model(tmp_path / "thr.onnx", CBS_CENTRES)
    out = tmp_path / "one"
    cbs, tld = sim_dataset / "0001_cbs.tif", sim_dataset / "0001_tld.tif"
    proc = kintsugi(
        "segment", "--model", model, "--image", f"tld={tld}", "--image", f"cbs={cbs}", "--out", out
    )
    assert proc.returncode == 0, proc.stderr
    assert "no ground-truth labels" in proc.stdout
    labels = tifffile.imread(out / "0001_cbs_labels.tif")
    assert labels.shape == (128, 160) and labels.dtype == np.uint8
    truth_run = kintsugi(
        "segment",
        "--model",
        model,
        "--image",
        f"cbs={cbs}",
        "--image",
        f"tld={tld}",
        "--truth",
        sim_dataset / "0001_labels.tif",
        "--out",
        tmp_path / "two",
    )
    assert truth_run.returncode == 0 and "mean IoU" in truth_run.stdout
    assert np.array_equal(tifffile.imread(tmp_path / "two" / "0001_cbs_labels.tif"), labels)


def test_segment_cli_errors(tmp_path: Path, sim_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kintsugi_daemon.cli import main
    from kintsugi_daemon.inference.contract import SHIPPED_MODEL

    model = str(build_threshold_model(tmp_path / "thr.onnx", CBS_CENTRES))
    out = str(tmp_path / "out")
    cbs = f"cbs={sim_dataset / '0000_cbs.tif'}"
    cases = [
        (["--model", str(tmp_path / "none.onnx"), str(sim_dataset)], "none.onnx does not exist"),
        (["--model", model, str(sim_dataset), "--pixel-size-m", "8e-8"], "pixel size 80.0 nm differs"),
        (["--model", model, "--image", cbs], r"needs detector(s) tld which the run does not image"),
        (["--model", model], "give either a dataset folder or --image"),
        (["--model", model, str(tmp_path / "nowhere")], "does not exist"),
        (["--model", model, str(tmp_path)], "has no dataset.json"),
        (
            ["--model", model, "--image", cbs, "--image", "tld=/no/such.tif"],
            "tld image /no/such.tif does not exist",
        ),
    ]
    if not SHIPPED_MODEL.exists():
        cases.append(([str(sim_dataset)], "the shipped model"))
    for args, message in cases:
        assert main(["segment", *args, "--out", out]) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["segment", "--model", model, str(sim_dataset), "--out", str(sim_dataset)]) == 2
    assert "ground truth would be overwritten" in capsys.readouterr().err
