"""Deprecated: the sparse artifact moved to :mod:`lightning_accel.deploy.sparse`."""

from lightning_accel._deprecated import forward_module

__getattr__ = forward_module(
    __name__, "lightning_accel.deploy.sparse", {"load_sparse", "load_sparse_", "save_sparse", "sparse_bytes"}
)
