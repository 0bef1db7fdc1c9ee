"""MODULE:CALLABLE specs (`--app`, `--task`): checked and imported in one place (stdlib only, as the
worker and the periodic task import it).

generate checks the form (`parse`); the worker and the task import the object (`load`) with the working
directory first on sys.path, as WorkingDirectory= sets it, and every failure is one ClusterctlError
naming the option and the fix.
"""

from __future__ import annotations

import importlib
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from clusterctl.errors import ClusterctlError

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
SPEC_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")


def parse(spec: str, option: str = "--app", *, form: str = "MODULE:CALLABLE", fix: str = "") -> tuple[str, str]:
    """(module, attribute path) of a well-formed spec, else an error naming `option` and `form`."""
    if not SPEC_RE.match(spec):
        raise ClusterctlError(f"{option} {spec!r} is not {form}",
                              fix or "name a module and an attribute, e.g. --app myproject.wsgi:application")
    module, _, attr = spec.partition(":")
    return module, attr


def load(spec: str, cwd: str, *, option: str = "--app", default_attr: str | None = None,
         what: str = "the WSGI or ASGI app", example: str = "myapp:app",
         fix_for: Callable[[BaseException], str | None] = lambda e: None) -> Any:
    """Import MODULE:CALLABLE from `cwd` (put first on sys.path) and return the callable. `default_attr`
    stands for a missing `:CALLABLE`; `fix_for` may name a better fix for an exception the import raised."""
    module_name, _, attr = spec.partition(":")
    attr = attr or default_attr or ""
    if not module_name or not attr:
        raise ClusterctlError(f"{option} {spec!r} names no module" if not module_name else
                              f"{option} {spec!r} is not MODULE:CALLABLE", f"write it as MODULE:CALLABLE, e.g. {example}")
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ClusterctlError(
                f"cannot import module {module_name!r} from {cwd}",
                f"run from the project directory (WorkingDirectory= in the unit) or fix {option}") from e
        raise ClusterctlError(f"importing {module_name!r} failed: {e}",
                              "install the missing dependency into the app's environment") from e
    except Exception as e:
        traceback.print_exc()
        raise ClusterctlError(f"importing {module_name!r} raised {type(e).__name__}: {e}",
                              fix_for(e) or "fix the error in the app (traceback above)") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ClusterctlError(f"module {module_name!r} has no attribute {attr!r}",
                                  f"point {option} at {what}, e.g. {example}") from e
    if not callable(obj):
        raise ClusterctlError(f"{spec} is a {type(obj).__name__}, not callable", f"point {option} at {what}")
    return obj
