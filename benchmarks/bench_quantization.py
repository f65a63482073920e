"""Int8: ONNX Runtime speed and file size of the int8 export against the fp32 export, and the cost of a QAT step.

``python -m benchmarks quantization``. All ratios are measured side by side in this one run.
"""

from __future__ import annotations

import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import interleaved_ratio
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
    torch.manual_seed(0)
    float_model = BenchCNN().eval()
    int8_model = BenchCNN()
    int8_model.load_state_dict(float_model.state_dict())
    calibration = [torch.randn(32, 3, 32, 32) for _ in range(8)]
    calibrate_(int8_model, calibration, num_batches=8, model_input=lambda batch: batch)
    with tempfile.TemporaryDirectory() as directory:
        fp32_path = export_onnx(float_model, Path(directory) / "fp32.onnx", torch.zeros(1, 3, 32, 32))
        int8_path = export_onnx(int8_model, Path(directory) / "int8.onnx", torch.zeros(1, 3, 32, 32))
        fp32_size, int8_size = fp32_path.stat().st_size, int8_path.stat().st_size
        sessions = {"fp32": session(fp32_path), "int8": session(int8_path)}
        print(f"\nBenchCNN (64/64/128 channels, 3x32x32), ONNX Runtime CPU, {THREADS} threads")
        print(f"file size: fp32 {fp32_size:,} B, int8 {int8_size:,} B ({int8_size / fp32_size:.1%} of fp32)")
        print("\n| batch | fp32 ms | int8 ms | int8 speed-up |")
        print("| --- | --- | --- | --- |")
        for batch, repeats in ((1, 200), (32, 20)):
            x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            times = {name: [] for name in sessions}
            for _ in range(5):  # alternate the two sessions so that load drift hits both
                for name, s in sessions.items():
                    times[name] += median_latency(lambda v, s=s: s.run(None, {"input": v}), x, repeats, 1)
            fp32, int8 = statistics.median(times["fp32"]), statistics.median(times["int8"])
            print(f"| {batch} | {fp32 * 1e3:.3f} | {int8 * 1e3:.3f} | {fp32 / int8:.2f}x |", flush=True)


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
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    onnx_table()
    qat_step_table()


if __name__ == "__main__":
    main()
