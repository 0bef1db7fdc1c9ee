"""The declarative file: `clusterctl.toml` (or `[tool.clusterctl]` in pyproject.toml) in the project dir.

What PM2's ecosystem file and gunicorn.conf.py are to their users: the apps of a project written down once,
so `clusterctl up` with no options starts every one. One table per app, `[apps.NAME]`, whose keys are
`clusterctl generate`'s long option names (`app`, `workers`, `listen = [...]`, `env = {K = "V"}`, ...);
options given on the command line win. Values are checked with the very click types of those options,
so the file and the command line can never disagree on what a value means; a bad key or value is an error
naming the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from clusterctl.control.plan import parse_name
from clusterctl.errors import ClusterctlError

FILE = "clusterctl.toml"
PYPROJECT = "pyproject.toml"


@dataclass(frozen=True)
class AppConfig:
    """One `[apps.NAME]` table, its values already converted to what the click option would give."""

    name: str
    values: dict[str, Any]
    source: Path
    table: str

    @property
    def origin(self) -> str:
        return f"{self.source} [{self.table}]"


def find(directory: Path | None = None) -> Path | None:
    """clusterctl.toml in `directory` (default: cwd), else a pyproject.toml there with [tool.clusterctl]."""
    d = directory or Path.cwd()
    if (d / FILE).is_file():
        return (d / FILE).resolve()
    pyproject = d / PYPROJECT
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return None  # not ours to judge unless it says [tool.clusterctl]
        if "clusterctl" in data.get("tool", {}):
            return pyproject.resolve()
    return None


def _read(path: Path) -> tuple[dict[str, Any], str]:
    """The clusterctl part of the file and the table prefix it lives under."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ClusterctlError(f"{path}: cannot read it: {e.strerror}", "check the file's permissions") from None
    except tomllib.TOMLDecodeError as e:
        raise ClusterctlError(f"{path}: not valid TOML: {e}", "fix the syntax (see https://toml.io)") from None
    if path.name == PYPROJECT:
        section = data.get("tool", {}).get("clusterctl", {})
        return (section if isinstance(section, dict) else {}), "tool.clusterctl."
    return data, ""


def app_names(path: Path) -> list[str]:
    """The app tables' names, unchecked (to tell whether a command-line app is one of them)."""
    apps = _read(path)[0].get("apps")
    return list(apps) if isinstance(apps, dict) else []


def load(path: Path, options: Iterable[click.Option], only: Iterable[str] = ()) -> list[AppConfig]:
    """Every app of the file (or those named in `only`), checked against `options` (generate's)."""
    data, prefix = _read(path)
    by_key: dict[str, click.Option] = {}
    for opt in options:
        for flag in opt.opts:
            if flag.startswith("--") and opt.name != "name":
                by_key[flag[2:]] = opt
    extra = sorted(set(data) - {"apps"})
    if extra:
        raise ClusterctlError(f"{path}: unknown table or key {prefix}{extra[0]!r}",
                              f"put each app in its own [{prefix}apps.NAME] table")
    apps = data.get("apps")
    if not isinstance(apps, dict) or not apps or not all(isinstance(v, dict) for v in apps.values()):
        raise ClusterctlError(f"{path}: no [{prefix}apps.NAME] tables",
                              f'add one per app, e.g. [{prefix}apps.web] with app = "myproject.wsgi:application"')
    wanted = list(only)
    missing = [n for n in wanted if n not in apps]
    if missing:
        raise ClusterctlError(f"{path} has no app {missing[0]!r} (it has {', '.join(apps)})",
                              f"add a [{prefix}apps.{missing[0]}] table, or name one of those")
    out = []
    for name, table in apps.items():
        if wanted and name not in wanted:
            continue
        where = f"{prefix}apps.{name}"
        try:
            parse_name(name)
        except ClusterctlError as e:
            raise ClusterctlError(f"{path} [{where}]: {e.message.replace('--name', 'the app name')}", e.fix) from None
        values = {}
        for key, value in table.items():
            opt = by_key.get(key) or by_key.get(key.replace("_", "-"))
            if opt is None:
                close = difflib.get_close_matches(key, by_key, n=1)
                raise ClusterctlError(f"{path} [{where}]: unknown key {key!r}",
                                      f"use {close[0]!r}" if close else
                                      "use the long option names of `clusterctl generate --help`, without the dashes")
            values[str(opt.name)] = _convert(opt, key, value, f"{path} [{where}]")
        if "app" not in values:
            raise ClusterctlError(f"{path} [{where}]: no app", f'add app = "myproject.wsgi:application" to [{where}]')
        out.append(AppConfig(name, values, path, where))
    return out


def _convert(opt: click.Option, key: str, value: Any, where: str) -> Any:
    """The TOML value as the click option would have produced it from the command line."""
    def bad(why: str, example: str) -> ClusterctlError:
        return ClusterctlError(f"{where}: {key} = {value!r} {why}", f"e.g. {key} = {example}")

    if opt.is_flag:
        if not isinstance(value, bool):
            raise bad("is not true or false", "true")
        return value
    if opt.multiple:
        if key == "env" and isinstance(value, Mapping):
            value = [f"{k}={v}" for k, v in value.items()]
        elif isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                                  for v in value):
            raise bad("is not a list of strings", '{ KEY = "VALUE" }' if key == "env" else '["..."]')
        return tuple(_one(opt, key, v, where) for v in value)
    if isinstance(value, (list, dict, bool)) and not isinstance(opt.type, click.types.BoolParamType):
        raise bad("is not a single value", '"..."')
    return _one(opt, key, value, where)


def _one(opt: click.Option, key: str, value: Any, where: str) -> Any:
    try:
        return opt.type.convert(str(value) if isinstance(value, int | float) and opt.type is click.STRING else value,
                                opt, None)
    except click.BadParameter as e:
        raise ClusterctlError(f"{where}: {key} = {value!r}: {e.message}",
                              f"see `clusterctl generate --help` for --{key}") from None
    except ClusterctlError as e:
        raise ClusterctlError(f"{where}: {key}: {e.message}", e.fix) from None
