"""What every benchmark script shares: the machine's description and writing the result JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def write_result(out: str, result: dict) -> None:
    """Write ``result`` as indented JSON at ``out`` (folders created) and print it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def replace_section(readme: Path, title: str, section: str) -> None:
    """Put ``section`` (starting with its ``title`` line) in place of the README's section of that title, up
    to the next ``## `` heading, or append it."""
    text = readme.read_text()
    if title in text:
        before, rest = text.split(title, 1)
        after = rest[rest.index("\n## "):] if "\n## " in rest else ""
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text)
