"""Torch's process-wide settings a run chooses: deterministic kernels (``train.deterministic``)."""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS is deterministic with a fixed workspace (CUDA >= 10.2); set before its first call."""


def make_deterministic() -> None:
    """cuDNN without autotuning and with deterministic algorithms, TF32 off (convolutions and
    matrix products in full fp32), and torch's deterministic implementations where they exist.

    Where none exists (e.g. adaptive average pooling's backward on CUDA) torch warns and runs the
    non-deterministic kernel: the warning names the operator, and that operator alone still
    differs between runs.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # The fp32_precision API only (torch refuses to mix it with the older allow_tf32 flags).
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.use_deterministic_algorithms(True, warn_only=True)
