"""The README is the user's manual: what it shows must be what the code does (issue 12's rough edges)."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from kintsugi_daemon.demo.harness import DemoOptions
from kintsugi_daemon.service.messages import COMMAND_MODELS

README = Path(os.environ.get("KINTSUGI_README", Path(__file__).resolve().parents[2] / "README.md"))


def _prose(text: str) -> str:
    """The README without code blocks, tables and the blocks the benchmarks generate (their "measured on"
    lines repeat by design): the sentences a person writes and reads."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"<!-- bench:([a-z0-9-]+) -->.*?<!-- /bench:\1 -->", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("|"))


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_sample_summary_is_a_default_demo() -> None:
    text = README.read_text()
    sample = re.search(r"```\nkintsugi demo summary\n(.*?)```", text, flags=re.S)
    assert sample is not None
    n = DemoOptions.slices
    assert f"slices            {n} of {n} requested" in sample.group(1)
    assert f"(mean of {n} slices)" in sample.group(1)
    assert "report " in sample.group(1)  # the demo prints the morning report's path
    assert f"a {n}-slice recipe" in text


def test_no_sentence_is_said_twice() -> None:
    """Twelve words in a row appearing twice in the prose is a paragraph pasted twice."""
    words = re.findall(r"[\w*`'-]+", _prose(README.read_text()).lower())
    runs = Counter(tuple(words[i : i + 12]) for i in range(len(words) - 11))
    repeated = [" ".join(run) for run, count in runs.items() if count > 1]
    assert repeated == []


def test_every_operator_verb_is_explained() -> None:
    """Each command of the MQTT contract has its own line, with what it does, in "A run"."""
    block = re.search(r"```\w*\n(.*?)```", _section(README.read_text(), "A run"), flags=re.S)
    assert block is not None
    explained = {
        verb
        for line in block.group(1).splitlines()
        if "#" in line
        for verb in re.findall(r"\b(\w+)\b", line.split("#")[0])
    }
    missing = sorted(set(COMMAND_MODELS) - explained)
    assert missing == []
