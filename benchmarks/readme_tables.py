"""README figures regenerated from the benchmarks' own output, never copied by hand.

Each benchmark builds its README table with `Table` and calls `publish(key, ...)`: the markdown is printed
and saved as `build/bench/<key>.md`, with a line saying when, on which machine and by which command it was
measured. `python -m benchmarks.readme_tables` (the last step of `make bench`) then replaces each README
block between `<!-- bench:KEY -->` and `<!-- /bench:KEY -->` with the saved fragment of that key. Blocks
whose benchmark did not run keep their previous figures (and their previous "measured" line), so running
one benchmark updates only its own tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FRAGMENTS = ROOT / "build" / "bench"
_KEY = re.compile(r"[a-z0-9][a-z0-9-]*")
_BLOCK = re.compile(r"<!-- bench:(?P<key>[a-z0-9-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=key) -->", re.S)


@dataclass
class Table:
    """A markdown table: a header row and rows of already formatted cells."""

    header: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.header):
            raise ValueError(f"row of {len(cells)} cells for a header of {len(self.header)}: {cells!r}")
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        def line(cells: Iterable[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        out = [line(self.header), "| " + " | ".join("---" for _ in self.header) + " |"]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


def machine() -> str:
    """The machine a figure depends on, in words: CPU model, cores this process may use, how busy it was
    (other jobs on the cores move timings), OS."""
    model = platform.processor() or platform.machine()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    system = f"{platform.system()} {platform.release()}"
    return f"{model}, {cores} cores usable, load average {load:.1f} (1 min), {system}"


def publish(key: str, *parts: Table | str, command: str | None = None) -> str:
    """Print the README block `key` (tables and text paragraphs, in order) and save it for the README."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"bench key {key!r}: use lower-case letters, digits and '-'")
    body = "\n\n".join(p.markdown() if isinstance(p, Table) else p.strip() for p in parts)
    run = command or _command_line()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"{body}\n\n<sub>Measured {stamp} on {machine()} by `{run}`.</sub>\n"
    print(f"\n{text}", flush=True)
    FRAGMENTS.mkdir(parents=True, exist_ok=True)
    tmp = FRAGMENTS / f".{key}.md.tmp"
    tmp.write_text(text)
    tmp.replace(FRAGMENTS / f"{key}.md")
    return text


def _command_line() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name.removesuffix(".__main__") if spec else Path(sys.argv[0]).name
    return " ".join(["python -m", module, *sys.argv[1:]])


def splice(readme: str, fragments: dict[str, str]) -> tuple[str, list[str], list[str]]:
    """README text with each fragment in its block; also the keys replaced and the README's blocks that had
    no fragment. A fragment whose block is missing, or a block that appears twice, is an error."""
    found = [m.group("key") for m in _BLOCK.finditer(readme)]
    twice = sorted({k for k in found if found.count(k) > 1})
    if twice:
        raise ValueError(f"README has more than one block for {', '.join(twice)}")
    orphans = sorted(set(fragments) - set(found))
    if orphans:
        raise ValueError(
            f"no README block <!-- bench:KEY --> ... <!-- /bench:KEY --> for {', '.join(orphans)}"
        )

    def replace(m: re.Match[str]) -> str:
        key = m.group("key")
        body = fragments.get(key, m.group("body")).strip()
        inner = f"{body}\n" if body else ""  # an empty block stays two lines
        return f"<!-- bench:{key} -->\n{inner}<!-- /bench:{key} -->"

    return (
        _BLOCK.sub(replace, readme),
        [k for k in found if k in fragments],
        [k for k in found if k not in fragments],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--fragments", type=Path, default=FRAGMENTS)
    args = parser.parse_args(argv)
    fragments = {p.stem: p.read_text() for p in sorted(args.fragments.glob("*.md"))}
    if not fragments:
        print(f"no benchmark output under {args.fragments}: run `make bench` (or one bench-*) first")
        return 1
    try:
        text, replaced, stale = splice(args.readme.read_text(), fragments)
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 2
    tmp = args.readme.with_name(f".{args.readme.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.readme)
    print(f"{args.readme.name}: {len(replaced)} tables regenerated ({', '.join(replaced)})")
    if stale:
        print(f"kept from an earlier run (their benchmark did not run now): {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
