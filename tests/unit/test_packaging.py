"""pyproject.toml builds without setuptools' deprecation warnings: the license is an SPDX expression
(a TOML table is deprecated, and builds stop being supported after 2027-02-18), which needs setuptools>=77."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())


def test_license_is_an_spdx_string():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"


def test_build_needs_a_setuptools_that_reads_spdx():
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    low = re.search(r">=\s*(\d+)", setuptools)
    assert low and int(low.group(1)) >= 77, setuptools
