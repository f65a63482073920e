"""The ``lightning-accel`` command: a LightningCLI with fit/validate/test/predict subcommands.

Models, data modules and callbacks are named by ``class_path`` in a YAML config, for example::

    lightning-accel fit --config examples/digits/accelerate.yaml
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info


class AccelCLI(LightningCLI):
    """LightningCLI that can evaluate the best checkpoint on the test set right after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--test_after_fit``."""
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run the test loop on the best checkpoint (or the final weights) and report it.",
        )

    def instantiate_classes(self) -> None:
        """Build the objects; a constructor's ``ValueError``/``TypeError`` becomes a one-line usage error."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            # jsonargparse wraps the constructor's error in several layers of its own; the innermost one names
            # the argument, the allowed values and the value given.
            root: BaseException = error
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            self.parser.error(f"invalid configuration: {root}")

    def after_fit(self) -> None:
        """Report where the logs went and, if asked, test the best checkpoint."""
        trainer = self.trainer
        if self.config[self.subcommand].get("test_after_fit"):
            checkpoint = trainer.checkpoint_callback
            has_best = isinstance(checkpoint, ModelCheckpoint) and bool(checkpoint.best_model_path)
            results = trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
            for name, value in sorted(results[0].items() if results else []):
                rank_zero_info(f"{name}: {value:.4f}")
        if trainer.logger is not None and trainer.log_dir is not None:
            log_root = os.path.dirname(trainer.log_dir)
            rank_zero_info(f"Logs written to {trainer.log_dir}; view them with: tensorboard --logdir {log_root}")


def build_cli(args: list[str] | None = None, run: bool = True) -> AccelCLI:
    """Parse a ``lightning-accel`` command line, build its objects and, by default, run the subcommand.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
        run: Whether to run the subcommand, or only parse the config and build the objects.

    Returns:
        The CLI object, holding ``trainer``, ``model`` and ``datamodule``.
    """
    # Console scripts do not put the working directory on sys.path (``python -m`` does). Add it, so that the
    # class_path of a model or data module in the user's project (e.g. ``examples.digits``) resolves either way.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    kwargs: dict[str, Any] = {"args": args, "run": run}
    if not run:
        # ``run=False`` builds the objects from one config without a subcommand.
        kwargs["save_config_callback"] = None
    return AccelCLI(**kwargs)


def main() -> None:
    """Entry point of the ``lightning-accel`` console script and ``python -m lightning_accel``."""
    build_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
