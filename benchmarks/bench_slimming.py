"""Channel pruning and slimming: a ResNet-18-shaped CNN with half the channels of every group removed, and the
digits model pruned by MagnitudePruning(pattern="channels") against torch-pruning's own one-shot MetaPruner.

``python -m benchmarks slimming``. All ratios are measured side by side in this one run.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from lightning import seed_everything

from benchmarks.common import THREADS, Section, goal, quiet_trainer
from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_accel import MagnitudePruning, calibrate_, count_macs, export_onnx, find_channel_groups, slim
from lightning_accel.export.check import ort_session
from lightning_accel.pruning import group_masks
from lightning_accel.report.measure import median_latencies
from tests.slim_models import ResNet

SPARSITY = 0.5


def prune_channels_(model: torch.nn.Module, example: torch.Tensor, sparsity: float) -> None:
    """Zero ``sparsity`` of every coupled group's channels, as the callback's final masks do."""
    groups = find_channel_groups(model, example)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in group_masks(parameters, groups, sparsity).items():
            parameters[name].mul_(mask)


def latency_rows(
    paths: dict[str, Path], shape: tuple[int, ...], quick: bool, reference: str, repeats: tuple[int, int] = (50, 8)
) -> tuple[list, dict]:
    """ORT latency of every file at batch 1 and 32, sessions interleaved; cells with the speed-up over ``reference``."""
    sessions = {name: ort_session(path, THREADS) for name, path in paths.items()}
    rows, data = [], {}
    for batch, count in ((1, 10 if quick else repeats[0]), (32, 2 if quick else repeats[1])):
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        runners = {name: (lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
        medians = median_latencies(runners, repeats=count, rounds=3 if quick else 5)
        data[batch] = {name: value * 1e3 for name, value in medians.items()}
        rows.append({name: (medians[name], medians[reference] / medians[name]) for name in paths})
    return rows, data


def resnet_table(quick: bool) -> Section:
    """ResNet-18's layout at 50% channels: MACs and ORT latency, fp32 and int8, dense against slim."""
    size = 32 if quick else 112  # half of ImageNet's 224 on each side: a quarter of ResNet-18's usual work
    shape = (3, size, size)
    example = torch.zeros(1, *shape)
    torch.manual_seed(0)
    dense = ResNet(width=64).eval()
    pruned = copy.deepcopy(dense)
    prune_channels_(pruned, example, SPARSITY)
    small = slim(pruned, example)
    macs = {"dense": count_macs(dense, example), "slim": count_macs(small, example)}
    calibration = [torch.randn(8, *shape) for _ in range(2 if quick else 4)]
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        paths = {
            "dense fp32": export_onnx(dense, directory / "dense.onnx", example, on_mismatch="ignore"),
            "slim fp32": export_onnx(small, directory / "slim.onnx", example, on_mismatch="ignore"),
        }
        for name, model in (("dense int8", dense), ("slim int8", small)):
            quantized = calibrate_(copy.deepcopy(model), calibration, model_input=lambda batch: batch)
            paths[name] = export_onnx(quantized, directory / f"{name.replace(' ', '_')}.onnx", example)
        rows, latency = latency_rows(paths, shape, quick, "dense fp32")
        sizes = {name: path.stat().st_size for name, path in paths.items()}
    mac_ratio = macs["dense"] / macs["slim"]
    b1, b32 = rows[0]["slim fp32"][1], rows[1]["slim fp32"][1]
    lines = [
        f"ResNet-18's layout (stem, 4 stages x 2 basic blocks, widths 64-512) on 3x{size}x{size} inputs, random "
        f"weights, {SPARSITY:.0%} of every coupled channel group removed (`find_channel_groups` + `group_masks` + "
        f"`slim`). ONNX Runtime CPU, {THREADS} threads, sessions interleaved; speed-ups against dense fp32.",
        "",
        "| | " + " | ".join(paths) + " |",
        "| --- |" + " --- |" * len(paths),
        "| MACs per image | "
        + " | ".join(f"{macs['slim' if 'slim' in n else 'dense'] / 1e6:,.1f} M" for n in paths)
        + " |",
        "| file size | " + " | ".join(f"{sizes[n]:,} B" for n in paths) + " |",
    ]
    for batch, row in zip((1, 32), rows, strict=True):
        cells = [f"{row[n][0] * 1e3:.2f} ms ({row[n][1]:.2f}x)" for n in paths]
        lines.append(f"| batch {batch} latency | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Goals: MACs {mac_ratio:.2f}x fewer (>= 3x: {goal(mac_ratio, 3.0, 'higher')}); slim fp32 {b1:.2f}x faster "
        f"at batch 1 and {b32:.2f}x at batch 32 (>= 2.5x: {goal(min(b1, b32), 2.5, 'higher')}).",
    ]
    data = {"macs": macs, "mac_ratio": mac_ratio, "sizes": sizes, "latency_ms": latency, "input": list(shape)}
    return Section("Channel pruning: ResNet-18-shaped CNN, dense against slim", "\n".join(lines) + "\n", data)


def _test_accuracy(model: torch.nn.Module, data: DigitsDataModule) -> float:
    images, labels = map(torch.cat, zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        return float((model.eval()(images).argmax(1) == labels).float().mean())


def digits_table(quick: bool) -> Section:
    """Same pretrained digits model, same fine-tuning budget: our gradual group pruning against MetaPruner."""
    import torch_pruning as tp

    pretrain, finetune = (2, 2) if quick else (6, 6)
    seed_everything(0, verbose=False)
    data = DigitsDataModule()
    base = DigitsClassifier()
    quiet_trainer(max_epochs=pretrain, deterministic=True).fit(base, datamodule=data)
    example = torch.zeros(1, 1, 8, 8)
    dense_macs = count_macs(base, example)

    seed_everything(1, verbose=False)
    dense = copy.deepcopy(base)
    quiet_trainer(max_epochs=finetune, deterministic=True).fit(dense, datamodule=data)

    seed_everything(1, verbose=False)
    ours = copy.deepcopy(base)
    # Magnitude: the criterion of the MetaPruner it is compared with (the default for channels is Taylor).
    pruning = MagnitudePruning(SPARSITY, pattern="channels", end_step=0.5, every_n_steps=5, importance="magnitude")
    quiet_trainer(max_epochs=finetune, deterministic=True, callbacks=[pruning]).fit(ours, datamodule=data)
    ours_small = slim(ours, example)

    seed_everything(1, verbose=False)
    theirs = copy.deepcopy(base)
    pruner = tp.pruner.MetaPruner(
        theirs.net,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=SPARSITY,
        ignored_layers=[theirs.net.classifier[3]],
    )
    pruner.step()  # one shot: physically removes the channels, then the same fine-tuning budget
    quiet_trainer(max_epochs=finetune, deterministic=True).fit(theirs, datamodule=data)

    models = {
        "dense (no pruning)": dense,
        "MagnitudePruning(channels), slim": ours_small,
        "torch-pruning MetaPruner": theirs,
    }
    with tempfile.TemporaryDirectory() as directory:
        paths = {
            name: export_onnx(model.eval(), Path(directory) / f"{i}.onnx", example, on_mismatch="ignore")
            for i, (name, model) in enumerate(models.items())
        }
        # sub-millisecond runs: many repeats, or scheduler noise decides the ratio
        rows, latency = latency_rows(paths, (1, 8, 8), quick, "dense (no pruning)", repeats=(2000, 200))
    lines = [
        f"Digits CNN pretrained {pretrain} epochs, then {finetune} epochs of fine-tuning for each contender from the "
        f"same weights: ours prunes {SPARSITY:.0%} of every channel group on a cubic schedule over the first half "
        f"of fine-tuning; MetaPruner (L2 group magnitude) removes {SPARSITY:.0%} in one shot before it. "
        f"ORT fp32, {THREADS} threads.",
        "",
        "| | MACs per image | test accuracy | batch 1 latency | batch 32 latency |",
        "| --- | --- | --- | --- | --- |",
    ]
    accuracy = {}
    for name, model in models.items():
        accuracy[name] = _test_accuracy(model, data)
        macs = count_macs(model, example)
        cells = [f"{rows[i][name][0] * 1e3:.3f} ms ({rows[i][name][1]:.2f}x)" for i in (0, 1)]
        work = f"{macs / 1e6:.2f} M ({dense_macs / macs:.2f}x fewer)"
        lines.append(f"| {name} | {work} | {accuracy[name]:.4f} | " + " | ".join(cells) + " |")
    data_out = {"accuracy": accuracy, "latency_ms": latency, "dense_macs": dense_macs}
    return Section("Channel pruning on digits against torch-pruning's MetaPruner", "\n".join(lines) + "\n", data_out)


def run(quick: bool) -> list[Section]:
    return [resnet_table(quick), digits_table(quick)]
