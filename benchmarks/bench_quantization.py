"""Int8: ONNX Runtime speed and file size of the int8 export against the fp32 export, and the cost of a QAT step.

``python -m benchmarks quantization``. All ratios are measured side by side in this one run.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import cpu_description, interleaved_ratio
from lightning_accel import QuantizationAwareTraining, calibrate_, export_onnx

THREADS = 2


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
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_latency(run, x: np.ndarray, repeats: int, rounds: int) -> list[float]:
    """Per-round mean latency of ``run(x)`` in seconds."""
    run(x)
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            run(x)
        results.append((time.perf_counter() - start) / repeats)
    return results


def onnx_table() -> None:
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
        print(f"\nBenchCNN (64/64/128 channels, 3x32x32), ONNX Runtime CPU, {THREADS} threads")
        print("\n| | " + " | ".join(names) + " |")
        print("| --- |" + " --- |" * len(names))
        print("| file size | " + " | ".join(f"{sizes[n]:,} B ({sizes[n] / sizes['fp32']:.1%})" for n in names) + " |")
        for batch, repeats in ((1, 200), (32, 20)):
            x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            times = {name: [] for name in sessions}
            for _ in range(5):  # alternate the sessions so that load drift hits all of them
                for name, s in sessions.items():
                    times[name] += median_latency(lambda v, s=s: s.run(None, {"input": v}), x, repeats, 1)
            medians = {name: statistics.median(t) for name, t in times.items()}
            cells = [f"{medians[n] * 1e3:.3f} ms ({medians['fp32'] / medians[n]:.2f}x)" for n in names]
            print(f"| batch {batch} latency (speed vs fp32) | " + " | ".join(cells) + " |", flush=True)


def qat_step_table() -> None:
    qat, fp32, ratio = interleaved_ratio(lambda: [QuantizationAwareTraining()], lambda: [], steps=200, repeats=5)
    print("\n| training step (digits CNN, batch 64) | ms/step |")
    print("| --- | --- |")
    print(f"| fp32, no callback | {fp32 * 1e3:.2f} |")
    print(f"| QuantizationAwareTraining (fake quant + observers) | {qat * 1e3:.2f} |")
    print(f"| QAT step / fp32 step | {ratio:.2f}x |")


def main() -> None:
    """Print both tables."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    print(f"machine: {cpu_description()}, torch {torch.__version__}")
    onnx_table()
    qat_step_table()


if __name__ == "__main__":
    main()
