"""The compiled fast lane (issue 21): whether it is here, and why not when it is not.

`clusterctl/http/_fast.c` is built by the package's build hook (hatch_build.py) when a C compiler and
Python's headers are there; without them, or with CLUSTERCTL_NO_COMPILE=1, the pure-Python engine runs.
"""

from __future__ import annotations

try:
    from clusterctl.http import _fast
except ImportError as e:  # not built: no compiler, CLUSTERCTL_NO_COMPILE=1, or a build for another Python
    _fast = None
    _WHY = f"the compiled engine is not built ({e}); install gcc and python3-dev and reinstall to get it"
else:
    _WHY = ""


def available() -> bool:
    return _fast is not None


def why_not() -> str:
    """One line for the worker's log when the compiled engine is not available; "" when it is."""
    return _WHY
