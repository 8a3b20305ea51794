"""The README tells the truth: its first commands, its command table and its config reference."""

from __future__ import annotations

import re
from pathlib import Path

from forgetting_ray.cli import build_parser
from forgetting_ray.config import config_reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def test_first_lines_are_the_two_commands():
    fence = README.read_text().split("```")[1]
    assert re.search(r"^make demo\b", fence, re.M) and re.search(r"^make test\b", fence, re.M)
    assert README.read_text().index("make demo") < 200


def test_config_reference_matches_the_code():
    text = README.read_text()
    block = text[text.index(START) + len(START):text.index(END)].strip()
    assert block == config_reference_markdown().strip(), "README config reference is stale: run `make readme`"


def test_every_documented_command_exists():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    documented = set(re.findall(r"`forgetting-ray (\w+)", README.read_text()))
    assert documented and documented <= commands, documented - commands
