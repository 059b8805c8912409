"""The README's benchmark tables are regenerated from the benchmarks' output (`benchmarks.readme_tables`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import readme_tables
from benchmarks.readme_tables import Table, splice

README = """# tool
text before
<!-- bench:idle -->
| old | table |
<!-- /bench:idle -->
between
<!-- bench:serve -->
| kept |
<!-- /bench:serve -->
after
"""


def test_splice_replaces_only_the_blocks_with_fresh_output() -> None:
    text, replaced, stale = splice(README, {"idle": "| new | table |\n"})
    assert replaced == ["idle"] and stale == ["serve"]
    assert "| new | table |" in text and "| old | table |" not in text
    assert "| kept |" in text  # a benchmark that did not run keeps its figures
    assert text.startswith("# tool\ntext before\n<!-- bench:idle -->\n| new | table |\n<!-- /bench:idle -->")
    assert text.endswith("between\n<!-- bench:serve -->\n| kept |\n<!-- /bench:serve -->\nafter\n")
    again, _, _ = splice(text, {"idle": "| new | table |\n"})
    assert again == text  # idempotent: the markers survive a regeneration
    empty = "a\n<!-- bench:idle -->\n<!-- /bench:idle -->\nb\n"
    assert splice(empty, {})[0] == empty  # a block not measured yet stays as it is


def test_splice_refuses_output_without_a_block_and_duplicate_blocks() -> None:
    with pytest.raises(ValueError, match=r"no README block .* for drills"):
        splice(README, {"drills": "| x |"})
    doubled = README + "<!-- bench:idle -->\n<!-- /bench:idle -->\n"
    with pytest.raises(ValueError, match="more than one block for idle"):
        splice(doubled, {"idle": "| x |"})


def test_table_checks_its_rows_and_escapes_pipes() -> None:
    table = Table(["figure", "latest"])
    table.add("median | p99", "1 ms")
    assert table.markdown().splitlines() == [
        "| figure | latest |",
        "| --- | --- |",
        "| median \\| p99 | 1 ms |",
    ]
    with pytest.raises(ValueError, match="row of 3 cells for a header of 2"):
        table.add("a", "b", "c")


def test_publish_then_regenerate_a_readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readme_tables, "FRAGMENTS", tmp_path / "bench")
    table = Table(["figure", "latest"])
    table.add("idle", "1.00 %")
    readme_tables.publish("idle", "Intro:", table, command="make bench-idle")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    rc = readme_tables.main(["--readme", str(readme), "--fragments", str(tmp_path / "bench")])
    text = readme.read_text()
    assert rc == 0 and "| idle | 1.00 % |" in text and "Intro:" in text
    assert re.search(
        r"Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+ cores usable.* by `make bench-idle`", text
    )
    assert readme_tables.main(["--readme", str(readme), "--fragments", str(tmp_path / "none")]) == 1
    with pytest.raises(ValueError, match="bench key"):
        readme_tables.publish("Bad Key", table)
