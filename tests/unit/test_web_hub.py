"""The web page's hub folding MQTT messages into views: bad payloads, repeats, previews and run history
from disk (no broker here: `apply` is what the subscription loop calls for each message)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kintsugi_daemon.service.preview import preview_identity, preview_png
from kintsugi_daemon.web.hub import Hub, MqttAccess

ROOT = "kintsugi/v1/hydra-01/"


def hub(runs: Path | None = None, only: list[str] | None = None) -> Hub:
    return Hub(MqttAccess("127.0.0.1", 1, None, None), runs, only or [])


def envelope(seq: int, kind: str, run_id: str = "r1", **data: object) -> bytes:
    body = {"type": f"kintsugi.{kind}", "session": "s1", "seq": seq, "run_id": run_id, "data": data}
    return json.dumps(body).encode()


def test_bad_payloads_are_kept_as_unreadable_and_never_raise() -> None:
    h = hub()
    h.apply(ROOT + "status", b"\xff\xfe not json")
    h.apply(ROOT + "progress", b"[1, 2]")
    h.apply(ROOT + "slices/latest", b"{")
    h.apply(ROOT + "events/step_started", b"null")
    h.apply(ROOT + "slices/latest/preview", b"not a png")
    h.apply("elsewhere/topic", b"{}")
    view = h.views["hydra-01"]
    assert view.status == {"unreadable": "\ufffd\ufffd not json"}
    assert view.progress == [1, 2]  # type: ignore[comparison-overlap]  # kept as sent, shown as is
    assert view.run_id is None and view.slices == {}


def test_repeated_events_are_dropped_and_other_runs_only_logged() -> None:
    h = hub()
    h.apply(ROOT + "progress", json.dumps({"run_id": "r1", "slice": 1, "total": 4}).encode())
    h.apply(ROOT + "events/segmented", envelope(7, "segmented", slice=0, porosity=0.3))
    h.apply(ROOT + "events/segmented", envelope(7, "segmented", slice=0, porosity=0.3))  # QoS 1 repeat
    h.apply(ROOT + "events/segmented", envelope(8, "segmented", run_id="other", slice=5, porosity=0.9))
    view = h.views["hydra-01"]
    assert [e["seq"] for e in view.events] == [7, 8]
    assert list(view.slices) == [0] and view.slices[0]["metrics"] == {"porosity": 0.3}


def test_alerts_raise_and_clear_and_an_instrument_filter_holds() -> None:
    h = hub(only=["hydra-01"])
    alert = {"id": "fault", "severity": "critical", "message": "stage", "since": 1.0}
    h.apply(ROOT + "alerts/fault", json.dumps(alert).encode())
    assert h.views["hydra-01"].alerts == {"fault": alert}
    h.apply(ROOT + "alerts/fault", b"")
    assert h.views["hydra-01"].alerts == {}
    h.apply("kintsugi/v1/hydra-02/status", b"{}")
    assert set(h.views) == {"hydra-01"}


def test_previews_say_their_slice_and_are_kept_per_run(tmp_path: Path) -> None:
    overlay = tmp_path / "o.png"
    Image.fromarray(np.full((400, 1600, 3), 200, np.uint8)).save(overlay)
    png = preview_png(overlay, "r1", 3)
    assert preview_identity(png) == ("r1", 3)
    with Image.open(io.BytesIO(png)) as small:
        assert small.size == (768, 192)  # scaled for a phone
    h = hub()
    h.apply(ROOT + "slices/latest/preview", png)
    view = h.views["hydra-01"]
    assert view.run_id == "r1" and view.slices[3]["overlay"] is True
    assert view.previews[("r1", 3)] == png


def write_run(run_dir: Path) -> None:
    slices = run_dir / "slices"
    slices.mkdir(parents=True)
    (run_dir / "previews").mkdir()
    for i in range(3):
        files = {"cbs": f"slices/{i:04d}_cbs.tif"}
        meta = {"face_position_m": 40e-9 * (i + 1)}
        (slices / f"{i:04d}.json").write_text(json.dumps({"index": i, "files": files, "metadata": meta}))
    (slices / "0000.segmentation.json").write_text(
        json.dumps(
            {"index": 0, "files": {"overlay": "previews/0000_overlay.png"}, "metrics": {"porosity": 0.2}}
        )
    )
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(run_dir / "previews" / "0000_overlay.png")
    (slices / "0003.json").write_text("{torn")  # a slice being written: skipped


def test_a_run_started_before_the_page_is_read_back_from_disk(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs / "r1")
    write_run(tmp_path / "secret")  # beside the runs directory: out of the page's reach
    h = hub(runs=runs)
    h.apply(ROOT + "progress", json.dumps({"run_id": "r1", "slice": 3, "total": 10}).encode())
    view = h.views["hydra-01"]
    assert sorted(view.slices) == [0, 1, 2]
    assert view.slices[0]["metrics"] == {"porosity": 0.2} and view.slices[0]["overlay"] is True
    assert view.slices[2]["z_m"] == pytest.approx(120e-9) and view.slices[2]["overlay"] is False
    assert h.overlay_file(view, 0) == (runs / "r1" / "previews" / "0000_overlay.png").resolve()
    # A run id cannot walk out of the runs directory.
    h.apply(ROOT + "progress", json.dumps({"run_id": "../secret", "slice": 1, "total": 2}).encode())
    assert view.slices == {} and h.overlay_file(view, 0) is None
