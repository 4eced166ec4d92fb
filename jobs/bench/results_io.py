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
