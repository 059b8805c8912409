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

from benchmarks.readme_tables import Table, publish  # noqa: E402
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
        rss = _peak_rss_mb()
        del pt, slab, void, mats, spec

    tgt = PRESETS[args.preset]
    shape = " × ".join(map(str, reversed(params.shape)))
    table = Table(["figure", "target", "latest"])
    table.add(f"specimen {shape} voxels, first build", "≤ 120 s", f"{t_build:.1f} s")
    table.add("specimen from the cache (with CRC check)", "≤ 5 s", f"{t_load:.2f} s")
    table.add(
        "simulator peak memory: build / with the infiltration", "-", f"{rss_build:.0f} MB / {rss:.0f} MB"
    )
    table.add(
        f"Pt infiltration of a {depth}-slice slab (throat {args.throat:g} voxels)",
        "-",
        f"{t_inf:.2f} s ({filled:.1%} of the void filled)",
    )
    targets = (("NMC", "nmc", tgt.nmc), ("CBD", "cbd", tgt.cbd), ("porosity", "porosity", tgt.porosity))
    fractions = ", ".join(f"{name} {fr[key]:.4f} ({want:.2f})" for name, key, want in targets)
    publish(
        "specimen",
        table,
        f"Volume fractions of the {args.preset} specimen (seed {args.seed}) against the preset: {fractions}.",
    )


if __name__ == "__main__":
    main()
