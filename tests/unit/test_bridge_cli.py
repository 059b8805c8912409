"""`kintsugi bridge`'s command line: the token comes from a file, checked by name; no token, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from kintsugi_daemon.cli.bridge import read_token_file
from kintsugi_daemon.cli.main import main


def test_the_token_file_must_hold_one_real_token(tmp_path: Path) -> None:
    good = tmp_path / "bridge.token"
    good.write_text("  s3cret-token-of-enough-length \n\n")
    assert read_token_file(good) == "s3cret-token-of-enough-length"
    for name, text in {"empty": "", "short": "abc\n", "two": "a" * 20 + "\n" + "b" * 20 + "\n"}.items():
        bad = tmp_path / name
        bad.write_text(text)
        with pytest.raises(ValueError, match=str(bad)):
            read_token_file(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_the_bridge_refuses_the_network_without_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any backend is opened: nothing of the microscope is touched.
    assert main(["bridge", "--backend", "demo", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "refusing to bind" in capsys.readouterr().err


def test_a_bad_token_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.token"
    assert main(["bridge", "--backend", "demo", "--token-file", str(path), "--port", "0"]) == 2
    assert str(path) in capsys.readouterr().err
