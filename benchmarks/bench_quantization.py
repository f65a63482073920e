"""Int8: ONNX Runtime speed and file size of the int8 export against the fp32 export, and the cost of a QAT step.

``python -m benchmarks quantization``. All ratios are measured side by side in this one run.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning import seed_everything
from torch import nn

from benchmarks.common import THREADS, Section, goal, interleaved_ratio, quiet_trainer
from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_accel import QuantizationAwareTraining, calibrate_, export_onnx
from lightning_accel.export.check import compare_outputs, ort_session
from lightning_accel.report.measure import median_latencies


class BenchCNN(nn.Module):
    """A 64/128-channel CNN on 3x32x32 images (conv-BN-ReLU blocks and a linear head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        return self.fc(x.flatten(1))


def session(path: Path):
    """An ONNX Runtime CPU session with all graph optimisations (QDQ fusion included)."""
    return ort_session(path, THREADS)


def onnx_table(quick: bool) -> Section:
    """fp32 against int8 with 7-bit weights (the default) and with full 8-bit weights, side by side."""
    torch.manual_seed(0)
    float_model = BenchCNN().eval()
    calibration = [torch.randn(32, 3, 32, 32) for _ in range(8)]
    with tempfile.TemporaryDirectory() as directory:
        paths = {"fp32": export_onnx(float_model, Path(directory) / "fp32.onnx", torch.zeros(1, 3, 32, 32))}
        for bits in (7, 8):
            int8_model = BenchCNN()
            int8_model.load_state_dict(float_model.state_dict())
            calibrate_(int8_model, calibration, num_batches=8, model_input=lambda batch: batch, weight_bits=bits)
            paths[f"int8 ({bits}-bit weights)"] = export_onnx(
                int8_model, Path(directory) / f"int8_{bits}.onnx", torch.zeros(1, 3, 32, 32)
            )
        sizes = {name: path.stat().st_size for name, path in paths.items()}
        sessions = {name: session(path) for name, path in paths.items()}
        names = list(sessions)
        lines = [
            f"BenchCNN (64/64/128 channels, 3x32x32), ONNX Runtime CPU, {THREADS} threads, sessions interleaved.",
            "",
            "| | " + " | ".join(names) + " |",
            "| --- |" + " --- |" * len(names),
            "| file size | " + " | ".join(f"{sizes[n]:,} B ({sizes[n] / sizes['fp32']:.1%})" for n in names) + " |",
        ]
        data = {"sizes": sizes, "latency_ms": {}}
        for batch, repeats in ((1, 20 if quick else 200), (32, 3 if quick else 20)):
            x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            runners = {name: (lambda s=s, x=x: s.run(None, {"input": x})) for name, s in sessions.items()}
            medians = median_latencies(runners, repeats=repeats, rounds=3 if quick else 5)
            cells = [f"{medians[n] * 1e3:.3f} ms ({medians['fp32'] / medians[n]:.2f}x)" for n in names]
            lines.append(f"| batch {batch} latency (speed vs fp32) | " + " | ".join(cells) + " |")
            data["latency_ms"][batch] = {n: v * 1e3 for n, v in medians.items()}
    return Section("Int8: ONNX Runtime int8 against fp32", "\n".join(lines) + "\n", data)


class CalibrationReader:
    """ONNX Runtime's calibration interface over digits training batches."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = iter([{"input": b} for b in batches])

    def get_next(self):
        return next(self.batches, None)


def train_digits(epochs: int, callbacks=()) -> tuple[DigitsClassifier, DigitsDataModule]:
    seed_everything(0, verbose=False)
    model, data = DigitsClassifier(), DigitsDataModule()
    quiet_trainer(max_epochs=epochs, callbacks=list(callbacks), deterministic=True).fit(model, datamodule=data)
    return model.eval(), data


def ptq_table(quick: bool) -> Section:
    """Our PTQ export against ONNX Runtime's quantize_static (default, and reduce_range) on one fp32 model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    epochs = 3 if quick else 12
    model, data = train_digits(epochs)
    train_batches = [x for x, _ in data.train_dataloader()][:16]
    images, labels = map(torch.cat, zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        reference = model(images)
    example = torch.zeros(1, 1, 8, 8)
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        fp32_path = export_onnx(model, directory / "fp32.onnx", example)
        ours = calibrate_(copy.deepcopy(model), train_batches, num_batches=16, model_input=lambda b: b)
        paths = {
            "fp32 (export_onnx)": fp32_path,
            "PTQ (calibrate_ + export_onnx)": export_onnx(ours, directory / "ours.onnx", example),
        }
        for reduce_range in (False, True):
            name = f"ORT quantize_static (QDQ, per-channel{', reduce_range' if reduce_range else ''})"
            target = directory / f"ort_{reduce_range}.onnx"
            quantize_static(
                str(fp32_path),
                str(target),
                CalibrationReader([b.numpy() for b in train_batches]),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            paths[name] = target
        sessions = {name: session(path) for name, path in paths.items()}
        lines = [
            f"Digits CNN trained {epochs} epochs in fp32; every int8 file calibrated on the same 16 training batches; "
            "quality on the 270 test images, agreement and SNR against the PyTorch fp32 logits.",
            "",
            "| export | size | test accuracy | agreement | SNR (dB) | batch 1 ms | batch 32 ms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        data_out = {}
        latency = {}
        for batch, repeats in ((1, 20 if quick else 200), (32, 5 if quick else 50)):
            x = images[:batch].numpy()
            runners = {name: (lambda s=s, x=x: s.run(None, {"input": x})) for name, s in sessions.items()}
            latency[batch] = median_latencies(runners, repeats=repeats, rounds=3 if quick else 5)
        for name, s in sessions.items():
            logits = torch.from_numpy(s.run(None, {"input": images.numpy()})[0])
            check = compare_outputs([reference], [logits])
            accuracy = (logits.argmax(1) == labels).float().mean().item()
            size = paths[name].stat().st_size
            lines.append(
                f"| {name} | {size:,} B | {accuracy:.4f} | {check.agreement:.2%} | {check.snr_db:.1f} | "
                f"{latency[1][name] * 1e3:.3f} | {latency[32][name] * 1e3:.3f} |"
            )
            data_out[name] = {
                "bytes": size,
                "accuracy": accuracy,
                "agreement": check.agreement,
                "snr_db": check.snr_db,
                "latency_ms": {b: latency[b][name] * 1e3 for b in latency},
            }
    lines += [
        "",
        "ORT's default (full-range int8 weights) is exact only on CPUs whose int8 dot products accumulate in int32 "
        "(VNNI/AMX/ARM); on AVX2 without VNNI it saturates, which `reduce_range` and our 7-bit default avoid.",
    ]
    return Section("Int8: PTQ against ONNX Runtime's quantize_static", "\n".join(lines) + "\n", data_out)


def torch_ao_qat_ratio(steps: int, repeats: int) -> tuple[float, float, float] | None:
    """Step time of torch.ao's deprecated eager QAT against the same plain fp32 loop (the historical reference)."""
    try:
        from torch.ao import quantization as ao
    except ImportError:
        return None
    data = DigitsDataModule()
    data.setup("fit")
    batches = list(data.train_dataloader())

    def make(qat: bool):
        torch.manual_seed(0)
        net = DigitsClassifier().net
        model = torch.nn.Sequential(ao.QuantStub(), net, ao.DeQuantStub()) if qat else net
        if qat:
            model.qconfig = ao.get_default_qat_qconfig("x86")
            ao.prepare_qat(model.train(), inplace=True)
        return model.train(), torch.optim.Adam(model.parameters(), lr=1e-3)

    def seconds_per_step(qat: bool) -> float:
        model, optimizer = make(qat)
        start = time.perf_counter()
        for step in range(steps):
            x, y = batches[step % len(batches)]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    seconds_per_step(False)
    qat_times, fp32_times = [], []
    for _ in range(repeats):
        fp32_times.append(seconds_per_step(False))
        qat_times.append(seconds_per_step(True))
    qat, fp32 = statistics.median(qat_times), statistics.median(fp32_times)
    return qat, fp32, qat / fp32


def qat_table(quick: bool) -> Section:
    """QAT step cost against fp32 (goal <= 1.2x), torch.ao's eager QAT beside it, and int8 accuracy."""
    steps, repeats = (40, 2) if quick else (200, 5)
    qat, fp32, ratio = interleaved_ratio(
        lambda: [QuantizationAwareTraining()], lambda: [], steps=steps, repeats=repeats
    )
    lines = [
        "| training step (digits CNN, batch 64) | ms/step | against its fp32 loop |",
        "| --- | --- | --- |",
        f"| fp32 Lightning loop, no callback | {fp32 * 1e3:.2f} | 1.00x |",
        f"| QuantizationAwareTraining (fake quant + observers) | {qat * 1e3:.2f} | {ratio:.2f}x (goal <= 1.2x: "
        f"{goal(ratio, 1.2)}) |",
    ]
    data = {"qat_ms": qat * 1e3, "fp32_ms": fp32 * 1e3, "ratio": ratio}
    reference = torch_ao_qat_ratio(steps, repeats)
    if reference is None:
        lines.append("| torch.ao eager QAT | not measured: this torch has no torch.ao.quantization | |")
    else:
        ao_qat, ao_fp32, ao_ratio = reference
        lines.append(f"| fp32 plain loop (torch.ao's reference) | {ao_fp32 * 1e3:.2f} | 1.00x |")
        lines.append(f"| torch.ao eager QAT (deprecated; x86 qconfig) | {ao_qat * 1e3:.2f} | {ao_ratio:.2f}x |")
        data["torch_ao"] = {"qat_ms": ao_qat * 1e3, "fp32_ms": ao_fp32 * 1e3, "ratio": ao_ratio}

    epochs = 3 if quick else 12
    fp32_model, digits = train_digits(epochs)
    qat_callback = QuantizationAwareTraining(start_step=0.667, freeze_bn_step=0.834, freeze_observers_step=0.917)
    qat_model, _ = train_digits(epochs, [qat_callback])
    images, labels = map(torch.cat, zip(*digits.test_dataloader(), strict=True))
    with tempfile.TemporaryDirectory() as directory:
        path = export_onnx(qat_model, Path(directory) / "qat.onnx", torch.zeros(1, 1, 8, 8))
        logits = torch.from_numpy(session(path).run(None, {"input": images.numpy()})[0])
    with torch.no_grad():
        fp32_accuracy = (fp32_model(images).argmax(1) == labels).float().mean().item()
    int8_accuracy = (logits.argmax(1) == labels).float().mean().item()
    lines += [
        "",
        f"Digits, {epochs} epochs (QAT from 2/3 of training): fp32 test accuracy {fp32_accuracy:.4f}, QAT int8 in "
        f"ONNX Runtime {int8_accuracy:.4f} ({(int8_accuracy - fp32_accuracy) * 100:+.2f} points).",
    ]
    data.update({"fp32_accuracy": fp32_accuracy, "int8_accuracy": int8_accuracy})
    return Section("Int8: QAT step cost and accuracy", "\n".join(lines) + "\n", data)


def run(quick: bool) -> list[Section]:
    """The ONNX Runtime table, PTQ against ORT's quantizer, and QAT."""
    return [onnx_table(quick), ptq_table(quick), qat_table(quick)]
