"""Test accuracy of an example config over several seeds: the mean and range that the READMEs quote.

One run's accuracy depends on the seed and on the CPU's float kernels, so a single figure misleads. Run::

    .venv/bin/python -m examples.seeds examples/digits/accelerate.yaml examples/digits/baseline.yaml

It trains each config once per seed (0, 1, 2 by default), tests the final weights, and prints one Markdown row
per config with the CPU named.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from lightning_accel import build_cli
from lightning_accel.report.measure import cpu_description, describe_cpu


def test_accuracy(config: str, seed: int, root: str) -> float:
    """Train ``config`` with ``seed`` and return the test accuracy of the final weights."""
    cli = build_cli(
        [
            "fit",
            "--config",
            config,
            f"--seed_everything={seed}",
            "--test_after_fit=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return float(results[0]["test/acc"])


def main() -> None:
    """Print ``| config | mean | min-max | per seed |`` for each config given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for config in options.configs:
            accuracies = [test_accuracy(config, seed, root) for seed in options.seeds]
            rows.append(
                f"| `{config}` | {statistics.mean(accuracies):.4f} | {min(accuracies):.4f}-{max(accuracies):.4f} | "
                + ", ".join(f"{a:.4f}" for a in accuracies)
                + " |"
            )
    print(f"Seeds {options.seeds} on {describe_cpu(cpu_description())}:")
    print("| config | mean test accuracy | range | per seed |\n| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
