"""lightning_accel: Lightning callbacks that make training faster and models smaller and faster."""

from lightning_accel.cli import AccelCLI, build_cli

__version__ = "0.1.0.dev0"

__all__ = ["AccelCLI", "__version__", "build_cli"]
