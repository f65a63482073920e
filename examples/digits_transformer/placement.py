"""Where to quantize activations on transformer blocks: each placement measured on one float model.

    python -m examples.digits_transformer.placement [--epochs 30]

Trains the float transformer once, then for each placement (``outputs="all"``: every Linear output quantized;
``outputs="auto"``: the Linear layers inside transformer blocks keep float outputs) measures
- PTQ: the int8 ONNX model calibrated on 16 training batches, against the float model (SNR, argmax agreement);
- QAT: 4 epochs of fine-tuning from the float weights (3 seeds), the int8 ONNX model's test accuracy and its
  SNR against the same fine-tuned weights in float (the quantization error alone);
- which int8 kernels ONNX Runtime runs (optimized graph) and how many QuantizeLinear nodes remain.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from lightning import Trainer, seed_everything

from benchmarks.common import quiet_trainer
from examples.digits import DigitsDataModule
from examples.digits_transformer import DigitsTransformerClassifier
from lightning_accel import QuantizationAwareTraining, calibrate_, export_onnx
from lightning_accel.export.check import compare_outputs, ort_session
from lightning_accel.quantization.prepare import float_copy
from lightning_accel.report.measure import cpu_description, describe_cpu

PLACEMENTS = ("all", "auto")


def _trainer(epochs: int, callbacks=()) -> Trainer:
    return quiet_trainer(max_epochs=epochs, deterministic=True, callbacks=list(callbacks))


def _int8_logits(model, directory: Path, name: str, tokens: torch.Tensor) -> torch.Tensor:
    path = export_onnx(model, directory / f"{name}.onnx", torch.zeros(1, 8, 8), on_mismatch="ignore")
    return torch.from_numpy(ort_session(path, 2).run(None, {"input": tokens.numpy()})[0])


def _kernels(path: Path, directory: Path) -> dict[str, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(directory / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(directory / "optimized.onnx")).graph.node]
    wanted = ("MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "MatMulInteger", "QuantizeLinear")
    return {op: ops.count(op) for op in wanted if op in ops}


def main() -> None:
    """Print one table row per placement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="float training epochs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    teacher = DigitsTransformerClassifier()
    _trainer(args.epochs).fit(teacher, datamodule=data)
    teacher.eval()
    images, labels = map(torch.cat, zip(*data.test_dataloader(), strict=True))
    tokens = images.reshape(-1, 8, 8)
    with torch.no_grad():
        reference = teacher(images)
    calibration = [x for x, _ in data.train_dataloader()][:16]
    accuracy = float((reference.argmax(1) == labels).float().mean())
    print(f"{describe_cpu(cpu_description())}; float model test accuracy {accuracy:.4f}")
    print("| outputs | PTQ SNR (dB) / agreement | QAT int8 test accuracy (3 seeds) | QAT SNR (dB) | ORT kernels |")
    print("| --- | --- | --- | --- | --- |")
    for placement in PLACEMENTS:
        with tempfile.TemporaryDirectory() as directory:
            directory = Path(directory)
            ptq = calibrate_(copy.deepcopy(teacher), calibration, 16, model_input=lambda b: b, outputs=placement)
            ptq_check = compare_outputs([reference], [_int8_logits(ptq, directory, "ptq", tokens)])
            kernels = _kernels(directory / "ptq.onnx", directory)
            accuracies, snrs = [], []
            for seed in (1, 2, 3):
                seed_everything(seed, verbose=False)
                model = copy.deepcopy(teacher)
                qat = QuantizationAwareTraining(start_step=0, freeze_observers_step=0.8, outputs=placement)
                _trainer(4, [qat]).fit(model, datamodule=data)
                model.eval()
                with torch.no_grad():
                    own_float = float_copy(model).eval()(images)
                logits = _int8_logits(model, directory, f"qat{seed}", tokens)
                accuracies.append(float((logits.argmax(1) == labels).float().mean()))
                snrs.append(compare_outputs([own_float], [logits]).snr_db)
        seeds = ", ".join(f"{a:.4f}" for a in accuracies)
        print(
            f"| {placement} | {ptq_check.snr_db:.1f} / {ptq_check.agreement:.2%} | {np.mean(accuracies):.4f} ({seeds}) "
            f"| {np.mean(snrs):.1f} | {', '.join(f'{k} {v}' for k, v in kernels.items())} |"
        )


if __name__ == "__main__":
    main()
