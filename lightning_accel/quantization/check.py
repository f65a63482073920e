"""Deprecated: the export check moved to :mod:`lightning_accel.deploy.check`."""

from lightning_accel._deprecated import forward_module

__getattr__ = forward_module(
    __name__,
    "lightning_accel.deploy.check",
    {
        "MIN_AGREEMENT",
        "MIN_SNR_DB",
        "ExportCheck",
        "check_onnx",
        "compare_outputs",
        "onnx_feed",
        "onnx_outputs",
        "onnx_session",
        "run_example",
        "snr_db",
        "split_example",
        "torch_outputs",
    },
)
