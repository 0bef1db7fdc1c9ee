"""MODULE:CALLABLE specs and listen addresses: each parsed and loaded in one place (appspec, address)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterctl import address, appspec
from clusterctl.errors import ClusterctlError


@pytest.fixture
def appdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "specapp.py").write_text("def app(environ, start_response): ...\nvalue = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_parse_names_the_option_and_the_form() -> None:
    assert appspec.parse("pkg.mod:obj.attr") == ("pkg.mod", "obj.attr")
    with pytest.raises(ClusterctlError, match=r"--task 'x' is not MODULE:FUNC"):
        appspec.parse("x", "--task", form="MODULE:FUNC")


@pytest.mark.parametrize(("spec", "option", "message", "fix"), [
    ("specapp:app", "--app", None, None),
    ("specapp", "--app", None, None),  # CALLABLE defaults to app for the worker
    (":app", "--app", "--app ':app' names no module", "MODULE:CALLABLE"),
    ("nosuchmod_xyz:app", "--app", "cannot import module 'nosuchmod_xyz' from", "fix --app"),
    ("specapp:nope", "--task", "module 'specapp' has no attribute 'nope'", "point --task at a function"),
    ("specapp:value", "--app", "specapp:value is a int, not callable", "point --app at the WSGI or ASGI app"),
])
def test_load_errors_name_the_problem_and_the_fix(appdir: Path, spec: str, option: str, message: str | None,
                                                 fix: str | None) -> None:
    what = "a function" if option == "--task" else "the WSGI or ASGI app"
    if message is None:
        assert callable(appspec.load(spec, str(appdir), option=option, default_attr="app", what=what))
        return
    with pytest.raises(ClusterctlError) as e:
        appspec.load(spec, str(appdir), option=option, default_attr="app", what=what)
    assert message in e.value.message and fix in str(e.value.fix)


def test_an_import_that_raises_gets_the_callers_fix(appdir: Path) -> None:
    (appdir / "boomapp.py").write_text("raise MemoryError('W+X')\n")
    with pytest.raises(ClusterctlError, match=r"importing 'boomapp' raised MemoryError: W\+X \(fix: allow it\)"):
        appspec.load("boomapp:app", str(appdir), fix_for=lambda e: "allow it" if isinstance(e, MemoryError) else None)


@pytest.mark.parametrize(("value", "unit_value", "reach", "url"), [
    ("8000", "8000", ("127.0.0.1", 8000), "http://127.0.0.1:8000/"),
    ("0.0.0.0:80", "0.0.0.0:80", ("127.0.0.1", 80), "http://127.0.0.1:80/"),
    ("[::]:80", "[::]:80", ("::1", 80), "http://[::1]:80/"),
    ("unix:/run/web.sock", "/run/web.sock", None, "unix:/run/web.sock"),
])
def test_address_spellings(value: str, unit_value: str, reach: tuple[str, int] | None, url: str) -> None:
    a = address.parse(value)
    assert (a.unit_value, a.url) == (unit_value, url)
    assert address.parse(a.unit_value) == address.parse(a.spec) == a  # ListenStream= and --listen read back
    if reach:
        assert a.reach == reach
