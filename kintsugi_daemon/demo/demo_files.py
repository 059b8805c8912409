"""The files `kintsugi demo` writes for its daemon: the recipe of the demo run and the daemon's settings
(TOML, as an operator would write them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from kintsugi_daemon.config import MqttSettings

if TYPE_CHECKING:
    from kintsugi_daemon.demo.harness import DemoOptions

__all__ = ["BRIDGE_DETECTORS", "demo_recipe", "settings_toml"]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _toml(sections: dict[str, dict[str, object]], header: str) -> str:
    lines = [f"# {header}"]
    for name, values in sections.items():
        if name:
            lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


# OpenFIBSEM's Demo microscope has ETD and TLD (no CBS); its images are noise.
BRIDGE_DETECTORS = ["tld", "etd"]


def demo_recipe(opts: DemoOptions, segmentation: bool) -> str:
    width_m = opts.width_px * opts.pixel_size_m
    height_m = opts.height_px * opts.pixel_size_m
    return _toml(
        {
            "run": {
                "name": "kintsugi-demo",
                "geometry": "cross_section",
                "slices": opts.slices,
                "slice_thickness_m": opts.slice_thickness_m,
            },
            "roi": {"width_m": width_m, "height_m": height_m},  # the imaged field of view
            "pt": {"every_slices": 1, "thickness_m": 100e-9, "beam": "electron"},
            "mill": {"species": "xe", "current_a": 15e-9},
            "polish": {"current_a": 1e-9, "passes": 1},
            "imaging": {
                "detectors": BRIDGE_DETECTORS if opts.bridge else ["cbs", "tld"],
                "width_px": opts.width_px,
                "height_px": opts.height_px,
                "pixel_size_m": opts.pixel_size_m,
                "dwell_s": 3e-6,
                "voltage_v": 5000.0,
                "current_a": 5e-9,
            },
            "segmentation": {"enabled": segmentation, "model": "builtin"},
            # The bridge's Demo microscope images noise: no fiducial to follow; its demo keeps the schedule.
            "adapt": {"policy": "fixed" if opts.bridge else opts.policy},
            # The fiducial's window near the top left, sized to the field of view.
            "adapt.drift": {
                "fiducial_x_px": opts.width_px // 32,
                "fiducial_y_px": opts.height_px // 32,
                "fiducial_width_px": max(32, min(256, opts.width_px // 4)),
                "fiducial_height_px": max(32, min(128, opts.height_px // 4)),
            },
            # The segmentation-driven policies need the model; without it the rest still adapt.
            "adapt.pt": {"enabled": segmentation},
            "adapt.stop": {"enabled": segmentation},
            # A demo writes tens of MB; the production default (2 GB free) would suspend it on a small disk.
            "guards": {"min_free_disk_bytes": 200_000_000},
        },
        "Written by `kintsugi demo`: a kintsugi cross-section run"
        + (
            ", adaptive (Pt, drift, focus, thickness, curtaining, imaging, stop rules)."
            if opts.policy == "adaptive" and not opts.bridge
            else ", Pt before every slice."
        ),
    )


def settings_toml(
    instrument_id: str, runs: Path, mqtt: MqttSettings, sim_url: str, token: str, deadline_scale: float
) -> str:
    return _toml(
        {
            "": {
                "instrument_id": instrument_id,
                "data_root": str(runs),
                "journal_path": str(runs / "journal.sqlite"),
            },
            "mqtt": {
                "host": mqtt.host,
                "port": mqtt.port,
                "username": mqtt.username,
                "password": mqtt.password,
                "protocol": mqtt.protocol,
            },
            # Deadlines follow the simulator's time scale, so a stuck step still times out in a demo.
            "instrument": {"url": sim_url, "token": token, "deadline_scale": deadline_scale},
            "logging": {"level": "info", "json_output": True},
        },
        "Written by `kintsugi demo`: daemon settings for this demo only.",
    )
