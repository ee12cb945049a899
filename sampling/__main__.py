"""``python -m sampling``: the benchmark CLI, :func:`sampling.bench.cli.main`.

The benchmark is an optional subpackage: where a vendored copy dropped it, this says so
and exits with status 2.
"""
from __future__ import annotations

import sys


def main(argv: list | None = None) -> int:
    try:
        from .bench.cli import main as bench_main
    except ModuleNotFoundError as e:
        if e.name not in (f"{__package__}.bench", f"{__package__}.bench.cli"):
            raise
        print(f"python -m {__package__}: the benchmark ({__package__}.bench) is not part of "
              f"this copy of the package; the core library works without it", file=sys.stderr)
        return 2
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
