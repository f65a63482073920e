"""Deprecated: the ONNX export moved to :mod:`lightning_accel.deploy` (``deploy.onnx`` and ``deploy.int8``)."""

from lightning_accel._deprecated import forward_module

_ONNX = {"ONNX_OPSET", "export_onnx", "export_onnx_checked", "store_int8_weights", "store_int32_biases"}
_INT8 = {"MIN_REWRITE_SNR_DB", "as_evaluated", "check_rewrite", "to_deployable"}
_from_onnx = forward_module(__name__, "lightning_accel.deploy.onnx", _ONNX)
_from_int8 = forward_module(__name__, "lightning_accel.deploy.int8", _INT8)


def __getattr__(name: str):
    return _from_int8(name) if name in _INT8 else _from_onnx(name)
