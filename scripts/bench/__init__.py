"""The benchmark harness behind `scripts/bench.py`.

One run mounts the same layers with every implementation (kernel overlayfs,
fuse-overlayfs, unionfs-fuse, pyunion, and a plain merged copy called
"native"), each measurement on a fresh instance (fresh upper, or a fresh copy
of the merged tree), and times the workloads W1..W10 cold and warm.

Modules, one concept each:
- `sizes`: the knobs of a full, a quick and a tiny (test) run.
- `image`: the cached image: root filesystem, layers in each format, the
  merged tree, the W8 tarball, the big data files, the mount-time stacks.
- `impls`: how each implementation mounts, unmounts and names its daemon.
- `procs`: processes: running with a timeout, dropping caches, daemon stats.
- `workloads`: what each workload does, run in a child process that times itself.
- `runner`: the measurement loop and its raw results.
- `report`: the table (text or markdown), ratios, geometric means.
- `cli`: the command line.
"""
