#!/usr/bin/env python3
"""Benchmark pyunion against kernel overlayfs, fuse-overlayfs, unionfs-fuse and a plain
merged copy. As root, from the checkout:

    python3 scripts/bench.py --quick            # a short run, under 3 minutes
    python3 scripts/bench.py --out bench.json   # the full run (tens of minutes)
    python3 scripts/bench.py --report bench.json --markdown   # its table, for the README

The image (debootstrap minbase bookworm + python3 in three layers, plus big data
files) is built once under --cache (default /var/tmp/pyunion-bench). The
harness itself is the package in scripts/bench/; see its __init__ for the tour.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the package scripts/bench/ beside this file (a package wins over a module of its name)
from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
