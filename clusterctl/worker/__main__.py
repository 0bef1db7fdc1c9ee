"""`python -m clusterctl.worker`: the process systemd starts for each instance (ExecStart=)."""

from __future__ import annotations

import sys

from clusterctl.worker.options import parse_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from clusterctl.errors import ClusterctlError
    from clusterctl.worker import runtime

    try:
        return runtime.run(cfg)
    except ClusterctlError as e:
        print(f"clusterctl worker: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
