"""Home Assistant MQTT discovery (optional, `[home_assistant] discovery = true`): retained config
messages under `<prefix>/<component>/kintsugi_<instrument>/<key>/config` that make the daemon's
existing topics appear as one device with sensors. Nothing new is published for Home Assistant: the
sensors read `status`, `progress`, `metrics` and `alerts/fault` with value templates."""

from __future__ import annotations

import json
from typing import Any, Final

from kintsugi_daemon.service.messages import Topics

__all__ = ["SENSORS", "discovery_messages"]

_AVAILABLE: Final = "{{ 'online' if value_json.state == 'online' else 'offline' }}"

# key -> (component, topic suffix, value template, extra config)
SENSORS: Final[dict[str, tuple[str, str, str, dict[str, Any]]]] = {
    "state": (
        "sensor",
        "status",
        "{{ value_json.path if value_json.state == 'online' else value_json.state }}",
        {"icon": "mdi:state-machine"},
    ),
    "slice": ("sensor", "progress", "{{ value_json.slice }}", {"state_class": "measurement"}),
    "slices_total": ("sensor", "progress", "{{ value_json.total }}", {}),
    "percent": (
        "sensor",
        "progress",
        "{{ value_json.percent }}",
        {"unit_of_measurement": "%", "state_class": "measurement"},
    ),
    "eta": (
        "sensor",
        "progress",
        "{{ value_json.eta_s | round(0) if value_json.eta_s is not none else none }}",
        {"unit_of_measurement": "s", "device_class": "duration"},
    ),
    "porosity": (
        "sensor",
        "metrics",
        "{{ value_json.porosity }}",
        {"state_class": "measurement", "suggested_display_precision": 3},
    ),
    "unfilled_pore_share": (
        "sensor",
        "metrics",
        "{{ value_json.unfilled_pore_share }}",
        {"state_class": "measurement", "suggested_display_precision": 3},
    ),
    "fault": (
        "binary_sensor",
        "alerts/fault",
        "{{ 'ON' if value | length > 0 else 'OFF' }}",
        {"device_class": "problem"},
    ),
}


def discovery_messages(instrument_id: str, prefix: str, version: str) -> dict[str, bytes]:
    """Topic -> retained JSON config for every sensor of one daemon."""
    topics = Topics(instrument_id)
    node = f"kintsugi_{instrument_id}"
    device = {
        "identifiers": [node],
        "name": f"kintsugi {instrument_id}",
        "manufacturer": "kintsugi-daemon",
        "model": "FIB-SEM serial sectioning daemon",
        "sw_version": version,
    }
    out: dict[str, bytes] = {}
    for key, (component, suffix, template, extra) in SENSORS.items():
        config = {
            "name": key.replace("_", " "),
            "unique_id": f"{node}_{key}",
            "object_id": f"{node}_{key}",
            "state_topic": topics.full(suffix),
            "value_template": template,
            "availability_topic": topics.status,
            "availability_template": _AVAILABLE,
            "device": device,
            **extra,
        }
        out[f"{prefix}/{component}/{node}/{key}/config"] = json.dumps(config, sort_keys=True).encode()
    return out
