"""pyunion: a userspace union filesystem for container image layers.

Overlayfs semantics over FUSE, and the container tools around it (docs/architecture.md).
"""

__version__ = "0.1.0"
