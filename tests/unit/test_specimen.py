"""Simulated specimen (fractions, determinism, cache, cracks, collector) and Pt infiltration."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from simulator.infiltration import infiltrate
from simulator.materials import Material
from simulator.specimen import (
    PRESET_TOLERANCE,
    PRESETS,
    PresetMissed,
    SpecimenParams,
    build_specimen,
    check_preset,
    default_cache_dir,
    fractions_of,
)

SMALL = (48, 160, 160)  # 1.9 x 6.4 x 6.4 um at 40 nm


def small(**kw: object) -> SpecimenParams:
    base: dict[str, object] = {"shape": SMALL, "d50_m": 2e-6, "collector_thickness_m": 0.4e-6}
    base.update(kw)
    return SpecimenParams(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("seed", [0, 1])
def test_presets_hit_targets(preset: str, seed: int) -> None:
    spec = build_specimen(small(preset=preset, seed=seed))
    fr = spec.fractions()
    want = PRESETS[preset]
    assert fr["nmc"] == pytest.approx(want.nmc, abs=0.01)
    assert fr["cbd"] == pytest.approx(want.cbd, abs=0.01)
    assert fr["porosity"] == pytest.approx(want.porosity, abs=0.03)
    assert fr["nmc"] + fr["cbd"] + fr["pore"] == pytest.approx(1.0)
    assert fr["crack"] > 0
    # counts agree with the array
    counts = np.bincount(spec.materials.ravel(), minlength=len(Material))
    assert {m.name: int(counts[m]) for m in Material} == spec.counts


def test_targets_on_strided_sample() -> None:
    """Above ~16M voxels the thresholds come from a strided sample; they must still land."""
    spec = build_specimen(small(shape=(40, 640, 640), d50_m=4e-6, preset="94:3:3"))
    fr = spec.fractions()
    assert fr["nmc"] == pytest.approx(0.56, abs=0.01)
    assert fr["cbd"] == pytest.approx(0.18, abs=0.01)


def test_reproducible_and_seeded() -> None:
    a = build_specimen(small(seed=3)).materials
    b = build_specimen(small(seed=3)).materials
    c = build_specimen(small(seed=4)).materials
    assert a.dtype == np.uint8
    assert a.shape == SMALL
    assert np.array_equal(a, b)
    assert np.mean(a != c) > 0.2


def test_cache_round_trip_and_corruption(tmp_path: Path) -> None:
    params = small(seed=5)
    seen: list[float] = []
    t0 = time.perf_counter()
    first = build_specimen(params, cache_dir=tmp_path, progress=seen.append)
    t_build = time.perf_counter() - t0
    assert seen == sorted(seen)
    assert seen[-1] == 1.0
    t0 = time.perf_counter()
    again = build_specimen(params, cache_dir=tmp_path)
    t_load = time.perf_counter() - t0
    assert isinstance(again.materials, np.memmap)
    assert not again.materials.flags.writeable
    assert np.array_equal(first.materials, again.materials)
    assert again.counts == first.counts
    assert np.allclose(again.particle_radii_vox, first.particle_radii_vox, atol=1e-3)
    assert t_load < t_build
    reference = np.array(first.materials)
    (npy,) = tmp_path.glob("specimen-*.npy")
    (meta,) = tmp_path.glob("specimen-*.json")
    del first, again

    # flipped data bytes -> CRC mismatch -> rebuilt
    data = bytearray(npy.read_bytes())
    data[-1000:] = bytes(1000)
    npy.write_bytes(bytes(data))
    assert np.array_equal(build_specimen(params, cache_dir=tmp_path).materials, reference)
    # truncated file
    npy.write_bytes(npy.read_bytes()[:5000])
    assert np.array_equal(build_specimen(params, cache_dir=tmp_path).materials, reference)
    # garbage header
    npy.write_bytes(b"not an npy file")
    assert np.array_equal(build_specimen(params, cache_dir=tmp_path).materials, reference)
    # broken sidecar
    meta.write_text("{")
    assert np.array_equal(build_specimen(params, cache_dir=tmp_path).materials, reference)
    assert json.loads(meta.read_text())["shape"] == list(SMALL)
    # different params -> different file
    build_specimen(small(seed=6), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("specimen-*.npy"))) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KINTSUGI_SIM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("KINTSUGI_SIM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "kintsugi-sim"


def test_cracks_open_closed_and_cbd_filled() -> None:
    mats = build_specimen(small(seed=2, crack_fraction=0.9, closed_crack_fraction=0.5)).materials
    cracks = mats == Material.CRACK
    assert np.any(mats == Material.CBD_CRACK)
    labels, n = ndimage.label(cracks, structure=np.ones((3, 3, 3), dtype=bool))
    outside = np.isin(mats, [Material.PORE, Material.CBD, Material.CBD_CRACK])
    # components with a 26-neighbour outside the particles are open
    touching = np.unique(labels[ndimage.binary_dilation(outside, np.ones((3, 3, 3), dtype=bool))])
    open_ids = set(touching.tolist()) - {0}
    assert open_ids, "no open crack"
    assert n - len(open_ids) > 0, "no closed crack"
    # every crack voxel sits inside a particle: its crack band is bordered by NMC
    assert np.any(ndimage.binary_dilation(cracks) & (mats == Material.NMC))


def test_collector_cross_section_bottom() -> None:
    mats = build_specimen(small(seed=1, collector_roughness_m=40e-9)).materials  # 1 voxel std
    al = mats == Material.AL
    thick = round(0.4e-6 / 40e-9)
    assert al[:, -2:, :].all()
    assert not al[:, : SMALL[1] - thick - 6, :].any()
    # AL is a suffix of every column (no particle below the interface, no AL islands above)
    first = np.argmax(al, axis=1)
    assert np.array_equal(al.sum(axis=1), SMALL[1] - first)
    assert (al.sum(axis=1) > thick - 6).all()
    assert al.sum(axis=1).std() > 0.2  # rough, not flat


def test_collector_planar_far_end() -> None:
    near = build_specimen(small(geometry="planar", electrode_thickness_m=1.4e-6)).materials
    assert (near[-1] == Material.AL).all()
    assert not (near[:20] == Material.AL).any()
    deep = build_specimen(small(geometry="planar")).materials  # 60 um electrode: no collector in view
    assert not (deep == Material.AL).any()


# ----------------------------------------------------------------------------------------------------
# Infiltration


def _hand_made() -> npt.NDArray[np.uint8]:
    v = np.full((12, 24, 24), Material.NMC, dtype=np.uint8)
    v[0:9, 2:6, 2:6] = Material.PORE  # A: 4x4 column open at the face, 9 deep
    v[2:5, 10:14, 2:6] = Material.PORE  # B: closed pore
    v[0:3, 14, 14] = Material.PORE  # C: 1-voxel channel from the face ...
    v[3:7, 12:18, 12:18] = Material.PORE  # ... into a chamber
    v[0:2, 2:6, 18:22] = Material.CRACK  # D: open empty crack slot (4 wide)
    v[0:4, 18:21, 2:6] = Material.CBD  # CBD at the face
    v[0:4, 20:23, 8:12] = Material.AL
    v[0:3, 8, 18] = Material.CRACK  # E: 1-wide open crack
    return v


def test_infiltration_hand_made() -> None:
    v = _hand_made()
    pt = infiltrate(v, 0, 12, throat_radius_vox=1.5)  # probe 3 voxels
    assert pt.shape == v.shape
    assert pt.dtype == np.bool_
    assert pt[0:9, 2:6, 2:6].all()  # A filled
    assert not pt[2:5, 10:14, 2:6].any()  # B closed
    assert not pt[3:7, 12:18, 12:18].any()  # C behind a throat narrower than the probe
    assert pt[0:2, 2:6, 18:22].all()  # D crack wide enough
    assert not pt[0:3, 8, 18].any()  # E too narrow
    void = (v == Material.PORE) | (v == Material.CRACK)
    assert not (pt & ~void).any()  # CBD, NMC, AL never

    loose = infiltrate(v, 0, 12, throat_radius_vox=0.0)  # plain connectivity
    assert loose[3:7, 12:18, 12:18].all()  # C reached through its channel
    assert loose[0:3, 8, 18].all()
    assert not loose[2:5, 10:14, 2:6].any()
    assert not (loose & ~void).any()


def test_infiltration_depth_and_face_offset() -> None:
    v = _hand_made()
    pt = infiltrate(v, 0, 4, throat_radius_vox=1.0)
    assert pt.shape == (4, 24, 24)
    assert pt[:, 2:6, 2:6].all()
    # face at slice 3: the column continues below, B now touches the face and fills
    pt = infiltrate(v, 2, 3, throat_radius_vox=1.0)
    assert pt.shape == (3, 24, 24)
    assert pt[:, 10:14, 2:6].all()
    # the slab is clipped at the end of the volume
    assert infiltrate(v, 10, 5, 1.0).shape == (2, 24, 24)
    with pytest.raises(ValueError, match="outside"):
        infiltrate(v, 12, 3, 1.0)


def test_infiltration_matches_connectivity_on_specimen() -> None:
    mats = build_specimen(small(seed=7, crack_fraction=0.9)).materials
    face, depth = 10, 20
    pt = infiltrate(mats, face, depth, throat_radius_vox=0.0)
    slab = np.asarray(mats[face : face + depth])
    void = (slab == Material.PORE) | (slab == Material.CRACK)
    labels, _ = ndimage.label(void)
    exact = np.isin(labels, np.unique(labels[0][labels[0] > 0]))
    assert np.array_equal(pt, exact)
    narrow = infiltrate(mats, face, depth, throat_radius_vox=2.0)
    assert not (narrow & ~exact).any()  # a probe never reaches what plain connectivity cannot
    assert narrow.sum() > 0.5 * exact.sum()


def test_a_specimen_that_misses_its_preset_is_an_error(tmp_path: Path) -> None:
    # particles far too large for the volume: the packing cannot reach 63 % NMC in it
    params = small(d50_m=12e-6, shape=(24, 60, 60))
    with pytest.raises(PresetMissed, match=r"96:2:2.*(nmc|cbd|porosity) "):
        build_specimen(params, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written into the cache
    good = fractions_of(build_specimen(small()).counts)
    check_preset(small(), {**{m.name: 0 for m in Material}, "NMC": 63, "CBD": 14, "PORE": 23})
    assert abs(good["nmc"] - PRESETS["96:2:2"].nmc) <= PRESET_TOLERANCE
    with pytest.raises(PresetMissed, match=r"nmc 0\.500"):
        check_preset(small(), {**{m.name: 0 for m in Material}, "NMC": 50, "CBD": 14, "PORE": 36})


def test_depth_covers_the_run_and_the_pore_back_reach() -> None:
    from simulator.factory import RunSize, specimen_params
    from simulator.pore_back import PORE_BACK_MAX_DEPTH_M

    size = RunSize(width_px=64, height_px=48, slices=30, slice_thickness_m=40e-9)
    params = specimen_params(size, preset="96:2:2", seed=0, geometry="cross_section")
    run_m = 30 * 40e-9 * 1.2  # the run with its thickness scatter
    assert params.shape[0] * params.voxel_size_m >= run_m + PORE_BACK_MAX_DEPTH_M
    assert PORE_BACK_MAX_DEPTH_M >= 5e-6
