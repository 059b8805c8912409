"""Image formation: grey ordering, noise, pore-back, geometry, SE edges, curtaining, EDX, grey transfer."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from simulator.curtaining import curtain_map
from simulator.detectors import SIN_52, eta_face_lut
from simulator.edx import render_edx
from simulator.imaging import (
    SIGNAL_REF,
    DetectorSetting,
    FaceView,
    ImagingConditions,
    Rendered,
    auto_contrast_brightness,
    grey_transfer,
    render,
)
from simulator.materials import BACKSCATTER_YIELD, CANONICAL_CLASSES, OUTSIDE_LABEL, Material
from simulator.pore_back import tilt_law

VOX = 40e-9
M = Material


def face_of(mat: np.ndarray, pt: np.ndarray | None = None, geometry: str = "cross_section") -> FaceView:
    assert geometry in ("cross_section", "planar")
    return FaceView(
        materials=mat.astype(np.uint8),
        pt=np.zeros(mat.shape, bool) if pt is None else pt,
        voxel_size_m=VOX,
        geometry="cross_section" if geometry == "cross_section" else "planar",
    )


def conditions(
    w: int,
    h: int,
    detectors: tuple[str, ...] = ("cbs",),
    bc: tuple[float, float] = (0.5, 0.5),
    **kw: object,
) -> ImagingConditions:
    base = ImagingConditions(
        detectors=tuple(DetectorSetting(n, *bc) for n in detectors),  # type: ignore[arg-type]
        width_px=w,
        height_px=h,
        pixel_size_m=40e-9,
        dwell_s=3e-6,
        line_integration=1,
        voltage_v=5e3,
        current_a=5e-9,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def snr_of(out: Rendered, cond: ImagingConditions, det: str, mask: np.ndarray) -> float:
    """Shot-noise SNR: mean signal over the rms of (image - noiseless signal), so texture is not noise."""
    setting = next(d for d in cond.detectors if d.name == det)
    scale, shift = grey_transfer(det, setting.brightness, setting.contrast)
    assert out.signal is not None
    measured = (out.images[det][mask].astype(np.float64) - shift) / scale
    clean = out.signal[det][mask].astype(np.float64)
    return float(clean.mean() / (measured - clean).std())


def with_auto_cb(face: FaceView, cond: ImagingConditions) -> ImagingConditions:
    dets = tuple(
        DetectorSetting(d.name, *auto_contrast_brightness(face, cond, d.name)) for d in cond.detectors
    )
    return dataclasses.replace(cond, detectors=dets)


def phase_bands() -> tuple[FaceView, dict[str, slice]]:
    """Vertical bands across the whole face and depth: Pt-filled pore, NMC, Al, CBD, deep empty pore."""
    mat = np.zeros((40, 200, 250), np.uint8)
    pt = np.zeros(mat.shape, bool)
    bands = {"pt": slice(0, 50), "nmc": slice(50, 100), "al": slice(100, 150), "cbd": slice(150, 200)}
    bands["pore"] = slice(200, 250)
    mat[:, :, bands["pt"]] = M.PORE
    pt[:, :, bands["pt"]] = True
    mat[:, :, bands["nmc"]] = M.NMC
    mat[:, :, bands["al"]] = M.AL
    mat[:, :, bands["cbd"]] = M.CBD
    mat[:, :, bands["pore"]] = M.PORE
    return face_of(mat, pt), bands


def test_cbs_grey_ordering() -> None:
    face, bands = phase_bands()
    cond = with_auto_cb(face, conditions(250, 140))
    out = render(face, cond, np.random.default_rng(0))
    cbs = out.images["cbs"].astype(float)
    means = {k: cbs[10:-10, s.start + 8 : s.stop - 8].mean() for k, s in bands.items()}
    assert means["pt"] > means["nmc"] > means["al"] > means["cbd"] > means["pore"]
    # contrast worth the name: each step is far above the noise
    assert means["cbd"] - means["pore"] > 5 * cbs[10:-10, 158:192].std()


@pytest.mark.parametrize(("material", "lo", "hi"), [(M.NMC, 40.0, 60.0), (M.CBD, 22.0, 38.0)])
def test_cbs_snr_at_published_settings(material: Material, lo: float, hi: float) -> None:
    face = face_of(np.full((4, 200, 160), material, np.uint8))
    # a uniform face fools auto C/B (no spread): centre the phase at mid-grey with a gain that keeps the
    # grain texture and the noise inside the 16-bit range
    eta = float(eta_face_lut("cross_section")[material])  # the tilt law at the face's 38 deg
    cond = conditions(160, 150, bc=((1.5 - eta / SIGNAL_REF["cbs"]) / 2, 0.6))
    rng = np.random.default_rng(1)
    interior = np.zeros((150, 160), bool)
    interior[5:-5, 5:-5] = True
    snr = snr_of(render(face, cond, rng), cond, "cbs", interior)
    assert lo <= snr <= hi
    slow = dataclasses.replace(cond, dwell_s=6e-6)
    ratio = snr_of(render(face, slow, rng), slow, "cbs", interior) / snr
    assert ratio == pytest.approx(math.sqrt(2), rel=0.08)


def test_noise_sane_at_zero_current() -> None:
    face = face_of(np.full((4, 80, 60), M.NMC, np.uint8))
    cond = conditions(60, 50, bc=(0.6, 0.6), current_a=0.0)
    out = render(face, cond, np.random.default_rng(2))
    assert np.all(np.isfinite(out.images["cbs"]))
    tiny = dataclasses.replace(cond, current_a=1e-15)
    out = render(face, tiny, np.random.default_rng(2))
    assert out.images["cbs"].dtype == np.uint16


def test_tld_cleaner_than_etd() -> None:
    face = face_of(np.full((4, 200, 160), M.NMC, np.uint8))
    cond = conditions(160, 150, detectors=("tld", "etd"), bc=((1.5 - 0.32) / 2, 0.75))
    out = render(face, cond, np.random.default_rng(3))
    interior = np.zeros((150, 160), bool)
    interior[5:-5, 5:-5] = True
    assert snr_of(out, cond, "tld", interior) > 1.3 * snr_of(out, cond, "etd", interior)


def test_pore_back_shallow_brighter_than_deep() -> None:
    mat = np.full((50, 200, 200), M.NMC, np.uint8)
    mat[:3, 40:100, 20:80] = M.PORE  # shallow: NMC right behind the face
    mat[:, 40:, 120:180] = M.PORE  # deep: empty along the whole beam path
    face = face_of(mat)
    cond = with_auto_cb(face, conditions(200, 150))
    out = render(face, cond, np.random.default_rng(4))
    assert out.signal is not None
    r0, r1 = math.ceil(45 * SIN_52), int(95 * SIN_52)  # image rows inside the pores (foreshortened)
    shallow = out.signal["cbs"][r0:r1, 28:72].mean()
    deep = out.signal["cbs"][r0:r1, 128:172].mean()
    assert shallow > 0.5 * 0.21  # most of the back wall's eta shines through
    assert deep < 0.01
    grey = out.images["cbs"].astype(float)
    assert grey[r0:r1, 28:72].mean() > grey[r0:r1, 128:172].mean() + 10 * grey[r0:r1, 128:172].std()
    # both still carry the unfilled-pore label: pore-back is an imaging artefact, not material
    assert np.all(out.labels[r0:r1, 28:72] == CANONICAL_CLASSES["unfilled_pore"])


def test_pore_back_fades_with_depth() -> None:
    values = []
    for depth_vox in (2, 8, 20):
        mat = np.full((60, 120, 60), M.NMC, np.uint8)
        mat[:depth_vox, 20:, 10:50] = M.PORE
        out = render(face_of(mat, geometry="planar"), conditions(60, 80), np.random.default_rng(0))
        assert out.signal is not None
        values.append(float(out.signal["cbs"][40:60, 20:40].mean()))
    assert values[0] > values[1] > values[2] > 0


def test_tilt_law() -> None:
    cos = np.cos(np.radians([0.0, 30.0, 60.0, 80.0, 90.0]))
    for eta0 in (0.08, 0.21, 0.39):
        eta = tilt_law(eta0, cos)
        assert eta[0] == pytest.approx(eta0, rel=1e-5)  # normal incidence: the tabulated yield
        assert np.all(np.diff(eta) > 0)  # rises steeply with tilt...
        assert eta[-1] == pytest.approx(1.0, rel=1e-5)  # ...towards 1 at grazing incidence
    # a light element gains relatively more than a heavy one (CBD vs Pt-C at 60 deg)
    assert tilt_law(0.08, 0.5) / 0.08 > tilt_law(0.39, 0.5) / 0.39


def _back_wall_signal(mat: np.ndarray, region: tuple[slice, slice]) -> float:
    out = render(
        face_of(mat, geometry="planar"), conditions(mat.shape[2], mat.shape[1]), np.random.default_rng(0)
    )
    assert out.signal is not None
    return float(out.signal["cbs"][region].mean())


def test_back_wall_collection_is_limited_by_the_opening() -> None:
    # the same NMC back wall 1 um behind the face, seen through a narrow and a wide pore
    narrow = np.full((60, 160, 160), M.NMC, np.uint8)
    narrow[:25, 60:100, 60:100] = M.PORE  # 1.6 um opening
    wide = np.full((60, 160, 160), M.NMC, np.uint8)
    wide[:25, 20:140, 20:140] = M.PORE  # 4.8 um opening
    centre = (slice(75, 85), slice(75, 85))
    n, w = _back_wall_signal(narrow, centre), _back_wall_signal(wide, centre)
    d, eta0 = 25 * VOX, BACKSCATTER_YIELD[M.NMC]
    for signal, a in ((n, 0.8e-6), (w, 2.4e-6)):  # solid angle of the opening: 1 - d / sqrt(d^2 + a^2)
        assert signal == pytest.approx(eta0 * (1 - d / math.hypot(d, a)), rel=0.25)
    assert w > 2 * n


def test_tilted_back_wall_outshines_a_face_on_one() -> None:
    # planar geometry (beam along the mill axis), one pore, back walls at the same depth (26 voxels) under
    # column 102: face-on in `flat`, a ramp rising 3 voxels per column (~72 deg tilt) in `ramp`
    flat = np.full((60, 200, 200), M.NMC, np.uint8)
    ramp = flat.copy()
    for c in range(20, 180):
        flat[:26, 20:180, c] = M.PORE
        ramp[: min(20 + 3 * max(c - 100, 0), 55), 20:180, c] = M.PORE
    region = (slice(90, 110), slice(102, 103))
    # (the normal comes from +-2-voxel occupancy, which flattens a steep staircase: expect >= 1.2x)
    assert _back_wall_signal(ramp, region) > 1.2 * _back_wall_signal(flat, region)


@pytest.mark.parametrize("geometry", ["cross_section", "planar"])
def test_labels_aligned_with_image(geometry: str) -> None:
    mat = np.full((4, 300, 200), M.CBD, np.uint8)
    ya, yb, xa, xb = 90, 170, 60, 130
    mat[:, ya:yb, xa:xb] = M.NMC
    face = face_of(mat, geometry=geometry)
    origin = (0.4e-6, 0.2e-6)  # 10 voxels right, 5 down
    cond = with_auto_cb(face, conditions(180, 200, origin_m=origin))
    out = render(face, cond, np.random.default_rng(5))
    fs = SIN_52 if geometry == "cross_section" else 1.0
    y = np.floor((origin[1] + np.arange(200) * 40e-9 / fs) / VOX + 1e-9).astype(int)
    x = np.floor((origin[0] + np.arange(180) * 40e-9) / VOX + 1e-9).astype(int)
    expected = ((y >= ya) & (y < yb))[:, None] & ((x >= xa) & (x < xb))[None, :]
    assert np.array_equal(out.labels == CANONICAL_CLASSES["active"], expected)
    rows = np.flatnonzero(expected.any(axis=1))
    # the NMC block covers (yb - ya) voxels = fewer image rows in cross-section (foreshortening)
    assert len(rows) == pytest.approx((yb - ya) * fs, abs=1)
    cbs = out.images["cbs"].astype(float)
    inner = np.zeros_like(expected)
    inner[rows[0] + 4 : rows[-1] - 3, xa - 10 + 4 : xb - 10 - 4] = True
    outer = ~expected
    outer[max(rows[0] - 6, 0) : rows[-1] + 7, xa - 10 - 6 : xb - 10 + 6] = False
    assert cbs[inner].min() > cbs[outer].max()


def test_outside_volume_reads_vacuum() -> None:
    face = face_of(np.full((4, 50, 50), M.NMC, np.uint8), geometry="planar")
    cond = conditions(80, 80, bc=(0.6, 0.6), origin_m=(-0.4e-6, 0.0))
    out = render(face, cond, np.random.default_rng(0))
    assert np.all(out.labels[:, :10] == OUTSIDE_LABEL)  # not specimen: never a material class
    assert np.all(out.labels[:50, 10:60] == CANONICAL_CLASSES["active"])
    assert out.signal is not None
    assert out.signal["cbs"][:, :5].max() < 0.01


def test_tld_edges_brighter_than_interiors() -> None:
    mat = np.full((40, 250, 200), M.CBD, np.uint8)
    yy, xx = np.mgrid[:250, :200]
    disk = (yy - 90) ** 2 + (xx - 100) ** 2 < 50**2
    mat[:, disk] = M.NMC
    mat[:, 190:, :] = M.PORE  # a deep pore below: its wall must light up
    face = face_of(mat, geometry="planar")
    out = render(face, conditions(200, 230, detectors=("tld", "cbs")), np.random.default_rng(6))
    assert out.signal is not None
    tld = out.signal["tld"]
    r = np.hypot(yy[:230] - 90, xx[:230] - 100)
    boundary = tld[np.abs(r - 50) < 1.0].mean()
    assert boundary > 1.2 * tld[r < 40].mean()
    assert boundary > 1.2 * tld[(r > 60) & (yy[:230] < 180)].mean()
    wall = tld[185:190, 20:180].max(axis=0).mean()  # solid side of the pore wall
    ring = np.hypot(*np.gradient(disk.astype(float))) > 0
    assert wall > tld[:230][ring[:230]].max()  # pore walls light up more than phase boundaries
    assert tld[192:, 20:180].mean() < 0.5 * boundary  # the pore itself stays dark
    # CBS has no edge overshoot: the rim stays between the two phase means
    cbs = out.signal["cbs"]
    assert cbs[np.abs(r - 50) < 1.0].mean() < cbs[r < 40].mean()


def test_defocus_and_astigmatism_blur() -> None:
    mat = np.full((4, 120, 120), M.CBD, np.uint8)
    mat[:, 40:80, 40:80] = M.NMC
    face = face_of(mat, geometry="planar")

    def edge_steepness(defocus: float = 0.0, astig: float = 0.0) -> tuple[float, float]:
        cond = conditions(120, 120, defocus_m=defocus, astigmatism=astig)
        out = render(face, cond, np.random.default_rng(0))
        assert out.signal is not None
        s = out.signal["cbs"]
        return float(np.abs(np.diff(s[60, :], axis=0)).max()), float(np.abs(np.diff(s[:, 60], axis=0)).max())

    sharp_x, sharp_y = edge_steepness()
    blur_x, blur_y = edge_steepness(defocus=30e-6)
    assert blur_x < 0.6 * sharp_x
    assert blur_y < 0.6 * sharp_y
    astig_x, astig_y = edge_steepness(astig=30e-6)
    assert astig_x < 0.6 * sharp_x
    assert astig_y == pytest.approx(sharp_y, rel=0.05)


def test_charging_brightens_insulating_areas() -> None:
    mat = np.full((4, 160, 160), M.NMC, np.uint8)
    mat[:, :, 80:] = M.CBD
    face = face_of(mat, geometry="planar")
    calm = render(face, conditions(160, 160, detectors=("tld",)), np.random.default_rng(0))
    charged = render(face, conditions(160, 160, detectors=("tld",), charging=1.0), np.random.default_rng(0))
    assert calm.signal is not None
    assert charged.signal is not None
    gain = charged.signal["tld"] - calm.signal["tld"]
    assert gain[:, 20:60].mean() > 2 * gain[:, 100:140].mean() > 0


def test_ice_shows_grain_contrast_in_nmc() -> None:
    face = face_of(np.full((4, 200, 200), M.NMC, np.uint8), geometry="planar")
    out = render(face, conditions(200, 200, detectors=("ice", "cbs")), np.random.default_rng(0))
    assert out.signal is not None
    ice, cbs = out.signal["ice"][5:-5, 5:-5], out.signal["cbs"][5:-5, 5:-5]
    assert ice.std() / ice.mean() > 0.1
    # BSE channelling contrast is a few percent: visible, far weaker than in the ion image
    assert 0.01 < cbs.std() / cbs.mean() < ice.std() / ice.mean() / 3


def curtain_rms(**kw: object) -> float:
    mat = np.full((300, 200), M.NMC, np.uint8)
    mat[60:80, 50:70] = M.PORE  # a void seeds a stripe below it
    args: dict[str, object] = {
        "cap_thickness_m": 0.0,
        "current_a": 15e-9,
        "species": "xe",
        "polish_passes": 0,
        "rng": np.random.default_rng(7),
    }
    args.update(kw)
    cmap = curtain_map(mat, **args)  # type: ignore[arg-type]
    assert cmap.shape == mat.shape
    assert cmap.dtype == np.float32
    return float(np.sqrt(np.mean((cmap - 1.0) ** 2)))


def test_curtain_amplitude_trends() -> None:
    base = curtain_rms()
    # a cap removes the top surface's seeding but not the void's below it
    assert 0.2 * base < curtain_rms(cap_thickness_m=1e-6) < 0.8 * base
    assert curtain_rms(polish_passes=1) == pytest.approx(0.85 * base, rel=1e-4)
    assert curtain_rms(polish_passes=2) < curtain_rms(polish_passes=1)
    assert curtain_rms(current_a=60e-9) == pytest.approx(2 * base, rel=1e-4)
    assert curtain_rms(species="ar") > base > curtain_rms(species="o")


def test_curtain_is_vertical_and_seeded_upstream() -> None:
    mat = np.full((300, 200), M.NMC, np.uint8)
    mat[100:120, 100:140] = M.PORE
    cmap = curtain_map(mat, 0.0, 15e-9, "xe", 0, np.random.default_rng(8)) - 1.0
    below = cmap[200:]
    assert below.std(axis=1).mean() > 10 * below.std(axis=0).mean()  # varies across columns, not rows
    # columns under the void carry stronger stripes than their neighbours further down
    assert np.abs(cmap[250, 100:140]).mean() > 1.3 * np.abs(cmap[250, 20:60]).mean()
    # Pt filling removes the void's step and with it the extra stripe
    pt = np.zeros(mat.shape, bool)
    pt[100:120, 100:140] = True
    filled = curtain_map(mat, 0.0, 15e-9, "xe", 0, np.random.default_rng(8), pt=pt) - 1.0
    assert np.abs(filled[250, 100:140]).mean() < np.abs(cmap[250, 100:140]).mean()


def test_curtaining_on_a_porous_face_is_several_percent_and_infiltration_suppresses_it() -> None:
    rng = np.random.default_rng(3)
    seeds = rng.random((400, 600)) < 0.002
    voids = ndi.maximum_filter(seeds, size=9)  # ~0.3 um voids scattered over the face
    mat = np.where(voids, M.PORE, M.NMC).astype(np.uint8)
    empty = curtain_map(mat, 1e-6, 15e-9, "xe", 0, np.random.default_rng(1)) - 1.0
    filled = curtain_map(mat, 1e-6, 15e-9, "xe", 0, np.random.default_rng(1), pt=voids) - 1.0
    rms_empty = float(np.sqrt(np.mean(empty[200:] ** 2)))
    rms_filled = float(np.sqrt(np.mean(filled[200:] ** 2)))
    assert 0.02 < rms_empty < 0.15  # several percent on the unfilled face (under a 1 um cap)
    assert rms_filled < 0.5 * rms_empty
    # stripes 0.2-2 um wide: neighbouring columns 5 px (0.2 um) apart still correlate
    profile = empty[300]
    assert np.corrcoef(profile[:-5], profile[5:])[0, 1] > 0.3


def test_curtain_persists_between_slices() -> None:
    mat = np.full((100, 300), M.NMC, np.uint8)
    first = curtain_map(mat, 0.0, 15e-9, "xe", 0, np.random.default_rng(1))
    second = curtain_map(mat, 0.0, 15e-9, "xe", 0, np.random.default_rng(2), previous=first)
    fresh = curtain_map(mat, 0.0, 15e-9, "xe", 0, np.random.default_rng(2))
    a, b, c = (m[-1] - m[-1].mean() for m in (first, second, fresh))
    assert np.corrcoef(a, b)[0, 1] > 0.5
    assert abs(np.corrcoef(a, c)[0, 1]) < 0.3


def test_curtain_applied_to_all_detectors() -> None:
    face = face_of(np.full((4, 200, 100), M.NMC, np.uint8), geometry="planar")
    cmap = curtain_map(face.materials[0], 0.0, 30e-9, "xe", 0, np.random.default_rng(0))
    dets = ("cbs", "tld")
    plain = render(face, conditions(100, 150, detectors=dets), np.random.default_rng(0))
    striped = render(face, conditions(100, 150, detectors=dets, curtain=cmap), np.random.default_rng(0))
    assert plain.signal is not None
    assert striped.signal is not None
    for d in dets:
        ratio = striped.signal[d][20:-20, 5:-5] / plain.signal[d][20:-20, 5:-5]
        np.testing.assert_allclose(ratio, cmap[20:130, 5:95], rtol=1e-4)


def test_edx_maps() -> None:
    mat = np.full((30, 300, 300), M.NMC, np.uint8)
    pt = np.zeros(mat.shape, bool)
    mat[:, :, 150:] = M.PORE
    pt[:, :, 150:] = True
    face = face_of(mat, pt)
    rng = np.random.default_rng(9)
    maps = render_edx(face, ["Ni", "Pt", "Al", "C"], 54e-9, 12e-6, 8e-6, (0.0, 0.0), 10e3, 1.6e-9, 1e-3, rng)
    ny, nx = round(8e-6 / 54e-9), round(12e-6 / 54e-9)
    assert all(m.shape == (ny, nx) and m.dtype == np.float32 for m in maps.values())
    left, right = slice(10, 80), slice(150, 210)  # > 1 um from the boundary at x = 6 um (col 111)
    assert maps["Ni"][:, left].mean() > 20 * max(maps["Ni"][:, right].mean(), 0.1)
    assert maps["Pt"][:, right].mean() > 20 * max(maps["Pt"][:, left].mean(), 0.1)
    assert maps["Al"].mean() < 0.5
    # counts scale with current * dwell
    more = render_edx(face, ["Ni"], 54e-9, 12e-6, 8e-6, (0.0, 0.0), 10e3, 3.2e-9, 1e-3, rng)
    assert more["Ni"][:, left].mean() == pytest.approx(2 * maps["Ni"][:, left].mean(), rel=0.05)
    # X-ray blur: the Ni edge spreads over ~1 um instead of one step
    profile = maps["Ni"][:, 90:130].mean(axis=0)
    assert np.count_nonzero((profile > 0.1 * profile[0]) & (profile < 0.9 * profile[0])) >= 8


def test_edx_fluorine_graded_towards_the_top() -> None:
    mat = np.full((20, 600, 100), M.CBD, np.uint8)
    face = face_of(mat, geometry="planar")
    rng = np.random.default_rng(0)
    f = render_edx(face, ["F"], 54e-9, 4e-6, 24e-6, (0.0, 0.0), 10e3, 1.6e-9, 2e-3, rng)["F"]
    assert f[20:100].mean() > 1.05 * f[-100:-20].mean()
    with pytest.raises(ValueError, match="Xx"):
        render_edx(face, ["Xx"], 54e-9, 1e-6, 1e-6, (0.0, 0.0), 10e3, 1e-9, 1e-3, np.random.default_rng(0))


def test_bad_settings_saturate() -> None:
    face, _ = phase_bands()
    for (b, c), value in (((1.0, 1.0), 65535), ((0.0, 1.0), 0)):
        out = render(face, conditions(250, 140, bc=(b, c)), np.random.default_rng(0))
        assert np.all(out.images["cbs"] == value)
    # too much contrast: the bright phases clip white and the dark ones black
    out = render(face, conditions(250, 140, bc=(0.6, 0.8)), np.random.default_rng(0))
    cbs = out.images["cbs"]
    assert np.mean(cbs == 65535) > 0.2
    assert np.mean(cbs == 0) > 0.2


def test_auto_contrast_brightness_fills_the_range() -> None:
    face, _ = phase_bands()
    cond = with_auto_cb(face, conditions(250, 140, detectors=("cbs", "tld")))
    out = render(face, cond, np.random.default_rng(0))
    for d in ("cbs", "tld"):
        lo, hi = np.percentile(out.images[d], [0.5, 99.5]) / 65535
        assert 0.0 <= lo < 0.1
        assert 0.9 < hi <= 1.0
        assert np.mean(out.images[d] == 65535) < 0.01


def test_deterministic_for_a_seed() -> None:
    face, _ = phase_bands()
    cond = conditions(250, 140, detectors=("cbs", "tld", "etd", "ice"), bc=(0.55, 0.6), charging=0.3)
    a = render(face, cond, np.random.default_rng(11))
    b = render(face, cond, np.random.default_rng(11))
    c = render(face, cond, np.random.default_rng(12))
    for d in ("cbs", "tld", "etd", "ice"):
        assert a.images[d].dtype == np.uint16
        assert a.images[d].shape == (140, 250)
        assert np.array_equal(a.images[d], b.images[d])
        assert not np.array_equal(a.images[d], c.images[d])
    assert np.array_equal(a.labels, b.labels)
    assert a.labels.dtype == np.uint8


def test_pt_source_sets_eta() -> None:
    mat = np.full((4, 50, 50), M.PORE, np.uint8)
    pt = np.ones(mat.shape, bool)
    e = face_of(mat, pt)
    i = dataclasses.replace(e, pt_source="ion")
    sig = [render(f, conditions(50, 30), np.random.default_rng(0)).signal for f in (e, i)]
    assert sig[0] is not None
    assert sig[1] is not None
    # tilt law at the cross-section face's 38 deg incidence; the Pt-C texture averages to ~1 (voids aside)
    expected = [float(tilt_law(eta0, math.cos(math.radians(38.0)))) for eta0 in (0.39, 0.44)]
    assert float(sig[0]["cbs"].mean()) == pytest.approx(expected[0], rel=0.05)
    assert float(sig[1]["cbs"].mean()) == pytest.approx(expected[1], rel=0.05)
    assert float(sig[1]["cbs"].mean()) > float(sig[0]["cbs"].mean())
