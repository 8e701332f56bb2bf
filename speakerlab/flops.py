"""Compute accounting for inference speed: what a model costs and what the machine can do.

A model's cost is the floating-point operations of its matrix products and convolutions
(a multiply-add counts as two), counted by :class:`torch.utils.flop_counter.FlopCounterMode` on
shape-only ("meta") tensors, so counting needs neither weights nor compute. Elementwise work
(activations, batch norm, pooling) is not counted: on these models it is well under 1 % of it.

The machine's limit is the rate of a large single-precision matrix product (SGEMM) in this
process with its current thread setting. A backend's efficiency is then
``model FLOPs processed per second / SGEMM FLOP/s``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

SGEMM_SIZE = 2048  # square operands: large enough for the BLAS's peak, small enough to time fast


def model_flops(model: nn.Module, frames: int, feat_dim: int | None = None) -> int:
    """Matrix-product and convolution FLOPs of embedding one utterance of ``frames`` fbank frames
    (input ``(1, frames, feat_dim)``; ``feat_dim`` defaults to the model's)."""
    return sum(model_flops_per_length(model, [frames], feat_dim).values())


def model_flops_per_length(
    model: nn.Module, frame_counts: Iterable[int], feat_dim: int | None = None
) -> dict[int, int]:
    """:func:`model_flops` for each distinct frame count, from one shape-only copy of ``model``."""
    feat_dim = int(feat_dim or getattr(model, "feat_dim", 80))
    meta_model = copy.deepcopy(model).to("meta").eval()
    counts = {}
    for frames in sorted(set(frame_counts)):
        feats = torch.empty(1, frames, feat_dim, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta_model(feats)
        counts[frames] = int(counter.get_total_flops())
    return counts


def matmul_flops_per_second(
    size: int = SGEMM_SIZE,
    dtype: torch.dtype = torch.float32,
    min_seconds: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """FLOP/s of ``size`` x ``size`` products in ``dtype`` by torch (its BLAS, with torch's
    current thread count); ``clock=time.process_time`` gives FLOP per CPU-second instead."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    return _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * size**3, min_seconds, clock)


def onnxruntime_matmul_flops_per_second(
    size: int = SGEMM_SIZE,
    num_threads: int | None = None,
    min_seconds: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """FLOP/s of ``size`` x ``size`` float32 products by ONNX Runtime's CPU provider (its own
    GEMM, which may use wider vector instructions than torch's BLAS on the same CPU)."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    shape = [size, size]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "sgemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal(shape, dtype=np.float32) for n in ("a", "b")}
    return _best_rate(lambda: session.run(None, inputs), 2.0 * size**3, min_seconds, clock)


def _best_rate(
    run: Callable[[], object], flops: float, min_seconds: float, clock: Callable[[], float]
) -> float:
    """``flops`` divided by the fastest of several timed ``run()`` calls after a warm-up (on a
    shared machine the fastest run is the closest to what the hardware does undisturbed)."""
    run()  # warm-up: thread pool start, packing buffers
    best = float("inf")
    deadline = time.perf_counter() + min_seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = clock()
        run()
        best = min(best, clock() - start)
        runs += 1
    return flops / max(best, 1e-9)
