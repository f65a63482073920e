"""``python -m lightning_accel``: the same as the ``lightning-accel`` command."""

from lightning_accel.cli.command import main

main()
