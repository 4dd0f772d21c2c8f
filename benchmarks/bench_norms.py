"""Same as ``normlab bench``; e.g. ``python benchmarks/bench_norms.py --quick``."""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
