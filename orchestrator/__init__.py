"""lfsorch: container-isolated build orchestrator for Linux From Scratch."""

__version__ = "0.1.0"
