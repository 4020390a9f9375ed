"""pyunion: a userspace union filesystem for container image layers (overlayfs semantics over FUSE)."""

__version__ = "0.1.0"
