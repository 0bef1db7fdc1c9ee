"""Hatch build hook: compile the optional C fast lane (clusterctl/http/_fast.c) into the wheel.

Optional by design: with no C compiler or Python headers, or CLUSTERCTL_NO_COMPILE=1, the build still
succeeds and the package runs the pure-Python engine (clusterctl.http.fastlane.why_not() says why).

One C file and no third-party build tool: the compiler is called directly with an argument list (the
compiler and flags Python itself was built with, from sysconfig), so neither setuptools nor Cython is a
build requirement. An editable install (`pip install -e .`, what .ci/setup does) puts the module next to
its source, where the .pth that points at the checkout finds it; a wheel gets it force-included.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("clusterctl") / "http" / "_fast.c"


def compile_fast(root: Path, out_dir: Path) -> Path | None:
    """Build the extension into out_dir; None (with a line on stderr saying why) when it cannot be built."""
    if os.environ.get("CLUSTERCTL_NO_COMPILE") == "1":
        print("clusterctl: CLUSTERCTL_NO_COMPILE=1: not building the C fast lane", file=sys.stderr)
        return None
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        print(f"clusterctl: no C compiler ({cc[:1]}): the pure-Python engine will be used", file=sys.stderr)
        return None
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        print(f"clusterctl: no Python.h in {include} (python3-dev): the pure-Python engine will be used",
              file=sys.stderr)
        return None
    target = out_dir / ("_fast" + sysconfig.get_config_var("EXT_SUFFIX"))
    src = root / SOURCE
    # Python's own flags (Debian's: -O2 -fwrapv -fstack-protector-strong -Werror=format-security ...), as
    # setuptools would pass them, and only the module's init function exported.
    flags = [*shlex.split(sysconfig.get_config_var("CFLAGS") or "-O2"),
             *shlex.split(sysconfig.get_config_var("CCSHARED") or "-fPIC")]
    cmd = [*cc, *flags, "-shared", "-fvisibility=hidden", f"-I{include}", str(src), "-o", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"clusterctl: building the C fast lane failed ({shlex.join(cmd)}, exit {done.returncode}):\n"
              f"{done.stderr[-4000:]}the pure-Python engine will be used", file=sys.stderr)
        return None
    return target


class FastLaneHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        if version == "editable":
            # A module left from an earlier build would be imported instead of the fallback: not built now
            # (CLUSTERCTL_NO_COMPILE=1, no compiler, an error) means none.
            for old in (root / SOURCE.parent).glob("_fast.*.so"):
                old.unlink()
            compile_fast(root, root / SOURCE.parent)
            return
        out = Path(tempfile.mkdtemp(prefix="clusterctl-fast-"))
        built = compile_fast(root, out)
        if built is not None:
            build_data["force_include"][str(built)] = str(SOURCE.parent / built.name)
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
