"""Latency of the transformer example at sequence length 128: ONNX Runtime int8 against fp32, side by side.

    python -m examples.digits_transformer.measure PATH/TO/accelerate-run.ckpt

Rebuilds the int8 model from the QAT checkpoint (``load_quantized``), exports it and its float weights at
sequence 128 (the digits use 8 tokens; the model accepts any length), and times both sessions interleaved.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from examples.digits_transformer import DigitsTransformerClassifier
from lightning_accel import export_onnx, load_quantized
from lightning_accel.export.check import ort_session
from lightning_accel.quantization.prepare import float_copy
from lightning_accel.report.measure import cpu_description, describe_cpu, median_latencies

SEQUENCE = 128


def main() -> None:
    """Print the latency table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint of examples/digits_transformer/accelerate.yaml")
    args = parser.parse_args()
    torch.set_num_threads(2)
    saved = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    hparams = {k: v for k, v in saved.items() if not k.startswith("_")}  # LightningCLI adds _class_path
    quantized = load_quantized(DigitsTransformerClassifier(**hparams), args.checkpoint)
    example = torch.zeros(1, SEQUENCE, 8)
    with tempfile.TemporaryDirectory() as directory:
        fp32 = ort_session(export_onnx(float_copy(quantized), Path(directory) / "fp32.onnx", example), 2)
        int8 = ort_session(export_onnx(quantized, Path(directory) / "int8.onnx", example), 2)
        print(f"Sequence {SEQUENCE}, ONNX Runtime CPU, {describe_cpu(cpu_description())}")
        print("| batch | ORT fp32 ms | ORT int8 ms | int8 speed vs fp32 |")
        print("| --- | --- | --- | --- |")
        for batch in (1, 32):
            x = np.random.default_rng(0).standard_normal((batch, SEQUENCE, 8)).astype(np.float32)
            runners = {
                name: (lambda s=s, x=x: s.run(None, {"input": x})) for name, s in (("fp32", fp32), ("int8", int8))
            }
            times = median_latencies(runners, repeats=20 if batch == 1 else 5)
            ratio = times["fp32"] / times["int8"]
            print(f"| {batch} | {times['fp32'] * 1e3:.3f} | {times['int8'] * 1e3:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
