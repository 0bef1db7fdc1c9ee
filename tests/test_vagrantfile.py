"""The Vagrantfile cannot run here (no VM), but it must at least be valid Ruby and name the right box."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clusterctl.proc import run

VAGRANTFILE = Path(__file__).resolve().parent.parent / "Vagrantfile"


def test_vagrantfile_names_debian_12_and_runs_up_and_the_suite() -> None:
    text = VAGRANTFILE.read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert "bash .ci/setup" in text and "clusterctl up --app examples.hello:app" in text and "--no-sandbox" in text
    assert "pytest" in text


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed")
def test_vagrantfile_is_valid_ruby() -> None:
    result = run(["ruby", "-c", str(VAGRANTFILE)], check=False)
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stdout + result.stderr
