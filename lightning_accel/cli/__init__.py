"""The ``lightning-accel`` command: LightningCLI with callback sections, one-line errors and ``export``."""

from lightning_accel.cli.command import CALLBACK_SECTIONS, AccelCLI, build_cli, main

__all__ = ["CALLBACK_SECTIONS", "AccelCLI", "build_cli", "main"]
