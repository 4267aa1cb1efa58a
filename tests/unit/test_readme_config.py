"""The README's configuration table names every `GATEWAY_*` variable `Settings` reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = [
        f"GATEWAY_{field.name.upper()}"
        for field in dataclasses.fields(Settings)
        if f"`GATEWAY_{field.name.upper()}`" not in section
    ]
    assert missing == []
