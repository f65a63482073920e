"""The ``lightning-accel`` command: a LightningCLI with fit/validate/test/predict subcommands.

Models, data modules and callbacks are named by ``class_path`` in a YAML config, for example::

    lightning-accel fit --config examples/digits/accelerate.yaml
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_accel.cli.config_errors import summarize_config_error
from lightning_accel.cli.export import ArtifactTrainer
from lightning_accel.distillation.callback import Distillation
from lightning_accel.precision.callback import MixedPrecision
from lightning_accel.pruning import MagnitudePruning
from lightning_accel.quantization import PostTrainingQuantization, QuantizationAwareTraining
from lightning_accel.report.callback import AccelerationReport

#: Top-level config sections, one per callback: ``--pruning.target_sparsity 0.5`` or ``pruning:`` in YAML adds
#: that callback to the Trainer, so each callback's options can be set on the command line by name.
CALLBACK_SECTIONS: dict[str, type] = {
    "precision": MixedPrecision,
    "pruning": MagnitudePruning,
    "qat": QuantizationAwareTraining,
    "ptq": PostTrainingQuantization,
    "report": AccelerationReport,
    "distillation": Distillation,
}


def _raised_in_this_package(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is lightning_accel's code."""
    traceback = error.__traceback__
    if traceback is None:
        return True
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return os.path.abspath(traceback.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # lightning_accel/


def _options(callback_class: type) -> list[str]:
    """The constructor options of a callback, in order."""
    return [name for name in inspect.signature(callback_class.__init__).parameters if name != "self"]


def _boolean_options() -> dict[str, set[str]]:
    """Our callbacks' options annotated ``bool``, by class name."""
    options = {}
    for callback_class in CALLBACK_SECTIONS.values():
        hints = inspect.signature(callback_class.__init__).parameters
        options[callback_class.__name__] = {name for name, p in hints.items() if p.annotation in ("bool", bool)}
    return options


def _loose_boolean(args: Any) -> str | None:
    """Find a true/false option of our callbacks given as a string ('yes', 'on', 1) in configs or arguments.

    jsonargparse reads the string 'yes' as YAML 1.1 and turns it into True; a typo such as 'ye' would not. Only
    the YAML booleans true/false (and those words on the command line) are accepted.
    """
    options = _boolean_options()
    args = [str(a) for a in args] if isinstance(args, list | tuple) else []
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in configs:
        problem = _loose_boolean_in_config(path, options)
        if problem:
            return problem
    return _loose_boolean_in_arguments(args, options)


def _callback_entries(loaded: Any) -> list[dict[str, Any]]:
    """The callback entries of a loaded config: ``trainer.callbacks`` items and our callback sections."""
    if not isinstance(loaded, dict):
        return []
    trainer = loaded.get("trainer") or {}
    listed = trainer.get("callbacks") or [] if isinstance(trainer, dict) else []
    entries = [entry for entry in listed if isinstance(entry, dict)]
    for key, callback_class in CALLBACK_SECTIONS.items():
        section = loaded.get(key)
        if isinstance(section, dict):
            entries.append({"class_path": callback_class.__name__, "init_args": section.get("init_args", section)})
    return entries


def _loose_boolean_in_config(path: str, options: dict[str, set[str]]) -> str | None:
    """The first true/false option of ours that a YAML config gives as something else."""
    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError):
        return None  # the parser reports unreadable configs itself
    for entry in _callback_entries(loaded):
        name = str(entry.get("class_path", "")).rpartition(".")[2]
        for option, value in (entry.get("init_args") or {}).items():
            if option in options.get(name, ()) and not isinstance(value, bool) and value is not None:
                return f"{name}: `{option}` must be true or false, got {value!r} (in {path})"
    return None


def _loose_boolean_in_arguments(args: list[str], options: dict[str, set[str]]) -> str | None:
    """The first true/false option of ours that the command line gives as something other than true/false."""
    for index, arg in enumerate(args):
        key, _, value = arg.partition("=")
        section, _, option = key.lstrip("-").partition(".")
        callback_class = CALLBACK_SECTIONS.get(section)
        if callback_class is None or option not in options[callback_class.__name__]:
            continue
        if not value and index + 1 < len(args):
            value = args[index + 1]
        if value.lower() not in ("true", "false"):
            return f"{callback_class.__name__}: `{option}` must be true or false, got {value!r}"
    return None


class _OneLineErrorParser(LightningArgumentParser):
    """A parser whose configuration errors are one ``error:`` line instead of a nested report and the usage."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        """Print one line naming the key, the expected values and the value given; exit with code 2."""
        if not self.exit_on_error:
            return super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        named = re.search(r"Subcommand '(\w+)'", message)
        if named and prog.split()[-1] != named.group(1):  # one hint everywhere: the subcommand's own help
            prog = f"{prog} {named.group(1)}"
        summary = summarize_config_error(message, list(CALLBACK_SECTIONS))
        sys.stderr.write(f"error: {summary} (options: {prog} --help)\n")
        sys.exit(2)


class AccelCLI(LightningCLI):
    """LightningCLI with callback sections, one-line configuration errors, ``--test_after_fit`` and ``export``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As LightningCLI; the Trainer class defaults to one that also has the ``export`` subcommand."""
        kwargs.setdefault("trainer_class", ArtifactTrainer)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands, plus ``export`` (artifacts and report from a checkpoint)."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--test_after_fit`` and one section per callback (``--pruning.*``, ``--qat.*``, ...)."""
        for key, callback_class in CALLBACK_SECTIONS.items():
            parser.add_argument(
                f"--{key}",
                type=Optional[callback_class],  # noqa: UP045 - jsonargparse reads this form
                default=None,
                help=f"Add lightning_accel.{callback_class.__name__} to the Trainer, with the options "
                f"{', '.join(_options(callback_class))} (--{key}.<option> VALUE, or a '{key}:' section in YAML). "
                f"What each means: lightning-accel fit --{key}.help {callback_class.__name__}",
            )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run the test loop on the best checkpoint (or the final weights) and report it.",
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, with configuration errors shortened to one line."""
        parser = super().init_parser(**kwargs)
        parser.__class__ = _OneLineErrorParser
        return parser

    def instantiate_classes(self) -> None:
        """Build the objects; our callbacks' argument errors become a one-line usage error.

        Errors raised in the user's own code (a model's ``__init__``, a data module) keep their full traceback:
        only a ``ValueError``/``TypeError`` raised inside lightning_accel is a configuration mistake to summarise.
        """
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            # jsonargparse wraps the constructor's error in several layers of its own; the innermost one names
            # the argument, the allowed values and the value given.
            root: BaseException = error
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            if not _raised_in_this_package(root):
                raise root from None
            subcommand = f" {self.subcommand}" if getattr(self, "subcommand", None) else ""
            sys.stderr.write(f"error: invalid configuration: {root} (options: lightning-accel{subcommand} --help)\n")
            sys.exit(2)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, after refusing non-boolean values for our callbacks' true/false options (YAML's 'yes', 'on')."""
        problem = _loose_boolean(args if args is not None else sys.argv[1:])
        if problem:
            parser.error(problem)
        super().parse_arguments(parser, args)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Build the Trainer with the callbacks of ``trainer.callbacks`` and of the callback sections."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        sectioned = [config[key] for key in CALLBACK_SECTIONS if config.get(key) is not None]
        if sectioned:
            listed = config["trainer"].get("callbacks") or []
            listed = listed if isinstance(listed, list) else [listed]
            kwargs["callbacks"] = [*listed, *sectioned, *kwargs.get("callbacks", [])]
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; a mistake our callbacks find before training ends in one ``error:`` line.

        Setup and fit-start checks (a pattern that does not fit the model, a step the fit never reaches, a missing
        example input) raise inside lightning_accel before the first optimizer step. Their message names the
        argument, what is allowed and what was given, so the 40-line traceback only hides it. Errors raised in the
        user's own code, and errors after training started, keep their traceback; ``LIGHTNING_ACCEL_TRACEBACK=1``
        keeps it for ours too. The empty log directory that the failed run made is removed.
        """
        problem = _missing_checkpoint(subcommand, self.config[subcommand].get("ckpt_path"), self.trainer)
        if problem:
            sys.stderr.write(f"error: {problem} (options: lightning-accel {subcommand} --help)\n")
            sys.exit(2)
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, TypeError, RuntimeError, ImportError) as error:
            trainer = getattr(self, "trainer", None)
            before_training = trainer is None or trainer.global_step == 0
            if not (before_training and _raised_in_this_package(error)) or os.environ.get("LIGHTNING_ACCEL_TRACEBACK"):
                raise
            _remove_empty_log_dir(trainer)
            message = " ".join(str(error).split())
            sys.stderr.write(
                f"error: {message} (found before training; options: lightning-accel {subcommand} --help; "
                "traceback: LIGHTNING_ACCEL_TRACEBACK=1)\n"
            )
            sys.exit(2)

    def after_fit(self) -> None:
        """Report where the logs went and, if asked, test the best checkpoint."""
        trainer = self.trainer
        if self.config[self.subcommand].get("test_after_fit"):
            checkpoint = trainer.checkpoint_callback
            has_best = isinstance(checkpoint, ModelCheckpoint) and bool(checkpoint.best_model_path)
            below_target = [
                c.best_checkpoint_below_target
                for c in trainer.callbacks
                if isinstance(c, MagnitudePruning) and c.best_checkpoint_below_target
            ]
            if has_best and checkpoint.best_model_path in below_target:
                # The "best" checkpoint predates the final sparsity: test what will be deployed instead.
                has_best = False
            which = f"the best checkpoint {checkpoint.best_model_path}" if has_best else "the final weights"
            rank_zero_info(f"Testing {which}")
            results = trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
            for name, value in sorted(results[0].items() if results else []):
                rank_zero_info(f"{name}: {value:.4f}")
        if trainer.logger is not None and trainer.log_dir is not None:
            log_root = os.path.dirname(trainer.log_dir)
            rank_zero_info(f"Logs written to {trainer.log_dir}; view them with: tensorboard --logdir {log_root}")


#: ``ckpt_path`` values that Lightning resolves itself rather than reading a file.
_CHECKPOINT_ALIASES = ("last", "best", "hpc")


def _missing_checkpoint(subcommand: str, ckpt_path: Any, trainer: Any) -> str | None:
    """One line when ``--ckpt_path`` names a file that does not exist, before anything runs; else ``None``.

    Lightning reads the file only after setting up the whole run and then ends in a 30-line traceback. For
    ``export``, whose only input is a checkpoint, the line lists the newest checkpoints under the run's folder.
    """
    if ckpt_path is None or str(ckpt_path) in _CHECKPOINT_ALIASES or str(ckpt_path).startswith("registry:"):
        return None
    if os.path.isfile(ckpt_path):
        return None
    message = f"`ckpt_path` {str(ckpt_path)!r}: no such file"
    if subcommand == "export":
        root = Path(getattr(trainer, "default_root_dir", None) or os.getcwd())
        found = sorted(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        listed = ", ".join(str(p) for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        message += f"; checkpoints under {root}: {listed}" if found else f"; there is no checkpoint under {root}"
    return message


#: What a run that failed before training leaves in its log directory; anything else is kept.
_SETUP_LEFTOVERS = ("config.yaml", "hparams.yaml", "events.out.tfevents.")


def _is_empty_tree(folder: str) -> bool:
    """Whether ``folder`` holds no file at any depth (only empty folders)."""
    return all(not files for _, _, files in os.walk(folder))


def _remove_empty_log_dir(trainer: Any) -> None:
    """Remove the log directory of a run that failed before training, if it holds only set-up files."""
    log_dir = getattr(trainer, "log_dir", None) if trainer is not None and trainer.is_global_zero else None
    if not log_dir or not os.path.isdir(log_dir):
        return
    entries = os.listdir(log_dir)
    # Artifact folders that setup's write probes made are empty; a folder holding anything is kept.
    folders = [e for e in entries if os.path.isdir(os.path.join(log_dir, e))]
    if all(_is_empty_tree(os.path.join(log_dir, e)) for e in folders) and all(
        e.startswith(_SETUP_LEFTOVERS) for e in entries if e not in folders
    ):
        for entry in entries:
            path = os.path.join(log_dir, entry)
            shutil.rmtree(path) if entry in folders else os.remove(path)
        os.rmdir(log_dir)
        parent = os.path.dirname(log_dir)
        if not os.listdir(parent):  # the run made ``lightning_logs`` itself
            os.rmdir(parent)


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
    sys.argv[0] = "lightning-accel"  # usage lines name the command, not __main__.py
    build_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
