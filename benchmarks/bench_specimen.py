"""Specimen build, cache load and Pt infiltration timings on one thread.

    python -m benchmarks.bench_specimen [--preset 96:2:2] [--seed 0] [--shape 200 1300 1536]

Builds into a fresh temporary cache folder, so the first build is a real one.
"""

from __future__ import annotations

import os

# One thread for every numeric library, set before numpy/scipy load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from simulator.infiltration import infiltrate  # noqa: E402
from simulator.materials import Material  # noqa: E402
from simulator.specimen import PRESETS, SpecimenParams, build_specimen  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--preset", default="96:2:2", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", type=int, nargs=3, default=(200, 1300, 1536))
    ap.add_argument("--slab", type=int, default=50, help="infiltration slab depth (slices)")
    ap.add_argument("--throat", type=float, default=1.5, help="throat radius (voxels)")
    args = ap.parse_args(argv)
    params = SpecimenParams(preset=args.preset, seed=args.seed, shape=tuple(args.shape))

    with tempfile.TemporaryDirectory(prefix="bench-specimen-") as tmp:
        cache = Path(tmp)
        t0 = time.perf_counter()
        build_specimen(params, cache_dir=cache)
        t_build = time.perf_counter() - t0
        rss_build = _peak_rss_mb()
        t0 = time.perf_counter()
        spec = build_specimen(params, cache_dir=cache)  # checks size + CRC32 of the whole file
        t_load = time.perf_counter() - t0

        mats = spec.materials
        depth = min(args.slab, mats.shape[0])
        face = (mats.shape[0] - depth) // 2
        np.asarray(mats[face : face + depth]).sum()  # page the slab in: time infiltration, not the disk
        t0 = time.perf_counter()
        pt = infiltrate(mats, face, depth, args.throat)
        t_inf = time.perf_counter() - t0
        slab = np.asarray(mats[face : face + depth])
        void = (slab == Material.PORE) | (slab == Material.CRACK)
        filled = float(np.count_nonzero(pt)) / max(1, int(np.count_nonzero(void)))
        fr = spec.fractions()
        del pt, slab, void, mats, spec

    tgt = PRESETS[args.preset]
    shape = "x".join(map(str, params.shape))
    print(f"specimen {shape} @ {params.voxel_size_m * 1e9:.0f} nm, preset {args.preset}, seed {args.seed}")
    print(f"{'first build':<28}{t_build:9.2f} s   (peak RSS {rss_build:.0f} MB)")
    print(f"{'cache load (+CRC check)':<28}{t_load:9.2f} s")
    print(
        f"{f'infiltrate {depth} slices r={args.throat:g}':<28}{t_inf:9.2f} s   ({filled:.1%} of void filled)"
    )
    print(f"{'peak RSS overall':<28}{_peak_rss_mb():9.0f} MB")
    print(f"{'fraction':<12}{'measured':>10}{'target':>10}{'error':>10}")
    for key, want in (("nmc", tgt.nmc), ("cbd", tgt.cbd), ("porosity", tgt.porosity)):
        print(f"{key:<12}{fr[key]:10.4f}{want:10.4f}{fr[key] - want:+10.4f}")
    for key in ("pore", "crack", "collector"):
        print(f"{key:<12}{fr[key]:10.4f}{'':>10}{'':>10}")


if __name__ == "__main__":
    main()
