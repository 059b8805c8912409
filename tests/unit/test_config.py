"""Daemon settings and recipes: strict loading with the key named, env overrides, `kintsugi validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kintsugi_daemon.config import ConfigError, load_settings, parse_recipe
from kintsugi_daemon.estimate import estimate_run

REPO = Path(__file__).resolve().parents[2]
GOOD = """
[run]
name = "t"
slices = 10
[roi]
width_m = 50e-6
height_m = 20e-6
"""


def test_defaults_and_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text('instrument_id = "hydra-7"\ndata_root = "/srv/runs"\n[mqtt]\nport = 1884\n')
    env = {"KINTSUGI_MQTT__PORT": "1999", "KINTSUGI_INSTRUMENT__TOKEN": "abc", "KINTSUGI_SIM_CACHE": "/x"}
    s = load_settings(path, env)
    assert s.instrument_id == "hydra-7" and s.data_root == Path("/srv/runs")
    assert s.mqtt.port == 1999  # the environment wins over the file
    assert s.instrument.token == "abc"
    assert s.journal_file == Path("/srv/runs/journal.sqlite")


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[mqtt]\nprot = 1\n", {}, "mqtt.prot"),  # typo
        ('[mqtt]\nport = "1883"\n', {}, "mqtt.port"),  # no coercion from strings
        ("[mqtt]\nport = 70000\n", {}, "mqtt.port"),
        ('instrument_id = "a/b"\n', {}, "instrument_id"),  # would break the topic tree
        ("", {"KINTSUGI_MQTT__KEEPALIVE_S": "nan"}, "mqtt.keepalive_s"),
        ("[instrument]\ndeadline_scale = inf\n", {}, "instrument.deadline_scale"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(path, env)


def test_bad_environment_value_names_the_variable_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text("[mqtt]\nport = 1884\n")  # the file is fine
    with pytest.raises(ConfigError) as err:
        load_settings(path, {"KINTSUGI_MQTT__PORT": "abc"})
    assert str(err.value).startswith("environment KINTSUGI_MQTT__PORT: mqtt.port:")
    assert str(path) not in str(err.value)
    # A bad key in the file is still blamed on the file.
    path.write_text('[mqtt]\nport = "x"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: mqtt\.port:"):
        load_settings(path, {"KINTSUGI_MQTT__HOST": '"broker"'})


def test_limits_read_in_scientific_notation_with_their_unit() -> None:
    bad = GOOD + "[mill]\ncurrent_a = 15\n"  # meant nA
    with pytest.raises(ConfigError) as err:
        parse_recipe(bad, "r.toml")
    assert (
        str(err.value) == "r.toml: mill.current_a: Input should be less than or equal to 2.5e-06 A (got 15)"
    )


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, {})


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("[run]\nname='t'\nslices=10\nspeed=2\n", "run.speed"),
        ("[run]\nname='t'\n", "give exactly one of run.slices or run.target_depth_m"),
        ("[run]\nname='t'\nslices=10\nslice_thickness_m=nan\n", "run.slice_thickness_m"),
        ("[run]\nname='t'\nslices=10\n[mill]\ncurrent_a=15\n", "mill.current_a"),  # nA given as A
        ("[run]\nname='t'\nslices=10\n[imaging]\ndetectors=['cbs','cbs']\n", "unique"),
        ("[run]\nname='t'\nslices=10\n[imaging]\ndetectors=['sem']\n", "imaging.detectors.0"),
    ],
)
def test_bad_recipes_name_the_key(change: str, key: str) -> None:
    text = change + ("" if "[roi]" in change else "\n[roi]\nwidth_m = 50e-6\nheight_m = 20e-6\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        parse_recipe(text)


def test_estimate_scales_with_the_recipe() -> None:
    base = estimate_run(parse_recipe(GOOD))
    assert base.slices == 10 and base.total_s == pytest.approx(base.seconds_per_slice * 10)
    fewer_pt = estimate_run(parse_recipe(GOOD + "[pt]\nevery_slices = 5\n"))
    assert fewer_pt.breakdown_s["deposit_pt"] == pytest.approx(base.breakdown_s["deposit_pt"] / 5)
    slower = estimate_run(parse_recipe(GOOD + "[imaging]\ndwell_s = 6e-6\n"))
    assert slower.breakdown_s["image"] == pytest.approx(2 * base.breakdown_s["image"])
    assert base.total_bytes == base.bytes_per_slice * 10 > 0


def test_validate_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "kintsugi_daemon.cli",
            "validate",
            str(REPO / "deploy/recipes/nmc811-cross-section.toml"),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "slices            400" in ok.stdout and "ETA" in ok.stdout and "disk needed" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("slices = 10", "slices = 10\nslice_thickness_m = -4e-8"))
    refused = subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", "validate", str(bad)], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "run.slice_thickness_m" in refused.stderr


ADAPTIVE = GOOD + '[adapt]\npolicy = "adaptive"\n'


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[adapt.drift]\nmin_score = 1.5\n", "adapt.drift.min_score"),
        ("[adapt.drift]\nmin_scor = 0.5\n", "adapt.drift.min_scor"),  # typo
        ("[adapt.pt]\nmax_unfilled_share = nan\n", "adapt.pt.max_unfilled_share"),
        ("[adapt.pt]\nmax_reach_fraction = 0\n", "adapt.pt.max_reach_fraction"),
        ("[adapt.imaging]\nsaturation_slices = 0\n", "adapt.imaging.saturation_slices"),
        ("[adapt.thickness]\ngain = 0\n", "adapt.thickness.gain"),
        ("[adapt.imaging]\nmin_dwell_s = 5e-6\nmax_dwell_s = 2e-6\n", "adapt.imaging.min_dwell_s exceeds"),
        # contradictions with another section, refused only when the adaptive policy reads them
        ("[adapt.imaging]\nmax_dwell_s = 2e-6\n", "imaging.dwell_s 3e-06 lies outside"),
        ("[adapt.curtaining]\nmin_mill_current_a = 20e-9\n", "adapt.curtaining.min_mill_current_a exceeds"),
        ("[adapt.drift]\nfiducial_x_px = 1400\n", "adapt.drift.fiducial_"),
        ("[segmentation]\nenabled = false\n", "adapt.pt.enabled needs segmentation.enabled"),
        ("[polish]\npasses = 5\n", "adapt.curtaining.max_polish_passes is below polish.passes"),
    ],
)
def test_bad_adapt_settings_name_the_key(extra: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_recipe(ADAPTIVE + extra)


def test_fixed_policy_ignores_adaptive_tables_it_does_not_read() -> None:
    recipe = parse_recipe(GOOD + "[segmentation]\nenabled = false\n[adapt.imaging]\nmax_dwell_s = 2e-6\n")
    assert recipe.adapt.policy == "fixed"


def test_validate_cli_refuses_contradictory_adapt_settings(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(ADAPTIVE)
    ok = subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "adapt             adaptive: drift (lag 1), stop (lag 2), pt (lag 2)" in ok.stdout
    path.write_text(ADAPTIVE + "[adapt.pt]\nmin_interval_slices = 9\nmax_interval_slices = 3\n")
    refused = subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "adapt.pt.min_interval_slices" in refused.stderr
