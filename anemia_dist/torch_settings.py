"""Torch's settings a run chooses: deterministic kernels (``train.deterministic``) and how a compiled
model (``train.compile``) keeps its number of compiled variants small.

Dynamo compiles one variant per combination of guards it sees: every new batch size, grad mode,
train/eval flag and ``requires_grad`` pattern; past its recompile limit (8) further variants run
uncompiled, silently. Batches with any batch size share one variant (:func:`any_batch_size`),
and the unfreeze starts afresh (:func:`recompile_after_unfreeze`): one training and one
validation variant before the unfreeze, the same two after.
"""

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


def any_batch_size(images: torch.Tensor) -> torch.Tensor:
    """The batch dimension compiled as symbolic: the smaller last batch reuses the compiled
    variant (``maybe``: a batch of one may still get its own; a no-op when nothing is compiled)."""
    torch._dynamo.maybe_mark_dynamic(images, 0)
    return images


def recompile_after_unfreeze() -> None:
    """Drop the compiled variants of the frozen phase (all their guards name the old
    ``requires_grad`` pattern): the next calls compile afresh instead of adding variants."""
    torch.compiler.reset()
