"""Technique-agnostic writers and checks: ONNX (with its int8 graph passes), ``.pt2``, half precision, sparse files."""
