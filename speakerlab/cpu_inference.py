"""Fast CPU inference: PyTorch models in float32 or bfloat16, ONNX Runtime session settings.

What :class:`speakerlab.embedder.TorchEmbedder` and :class:`speakerlab.embedder.OnnxEmbedder` use
on the CPU. PyTorch (:func:`prepare_cpu_model`):

* every batch norm that directly follows a convolution is folded into it (its scale and shift
  become the convolution's weights and bias), which removes a pass over every activation;
* 2-D convolution weights are put in channels-last layout, so oneDNN runs its NHWC kernels
  without converting the activations' layout around each convolution;
* bfloat16 (``precision="bf16"``, :func:`require_bf16`) runs the convolutions and matrix
  products under ``torch.autocast``, only on CPUs with bfloat16 instructions.

Memory: glibc's malloc gives large blocks straight from the kernel and returns them on free, so
each forward pass would fault in its activations (about 100 MB for ERes2Net base on 8 s) as
fresh zeroed pages; :func:`reuse_freed_memory` makes it keep and reuse them.

Threads: PyTorch's OpenMP threads and ONNX Runtime's pool by default spin while they wait for
work. On a machine whose cores are shared with other processes a spinning thread takes the core
from the thread that has work, and a model of hundreds of small operators slows down many
times. The inference commands therefore wait passively: ``OMP_WAIT_POLICY=PASSIVE`` (read
when PyTorch is imported, so ``speakerlab.cli`` sets it for them before that) and
:func:`onnx_session_options`.
"""

from __future__ import annotations

import copy
import ctypes
import sys
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from speakerlab.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
_CONVS = (nn.Conv1d, nn.Conv2d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Input lengths of the forward passes that find the foldable pairs and check the folded model.
_EXAMPLE_FRAMES = 100
_CHECK_FRAMES = 123
# The folded model must give the same embeddings as the original to float rounding.
_FOLD_MIN_COSINE = 0.99999
# mallopt parameters; the threshold tried first, then glibc's largest allowed mmap threshold.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = (1 << 30, 32 << 20)


# --------------------------------------------------------------------------- float32


class _UseCounter(TorchFunctionMode):
    """Counts, per watched tensor, the torch functions that take it as an argument, except
    those called inside a batch norm (while ``inside`` > 0). Watched tensors are held in
    ``watched`` (by id) from their creation on, so an id always means the same tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[nn.Module, torch.Tensor]] = {}
        self.uses: Counter[int] = Counter()
        self.inside = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            for value in _tensors((args, kwargs or {})):
                if id(value) in self.watched:
                    self.uses[id(value)] += 1
        return func(*args, **(kwargs or {}))


def _tensors(value: object) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts of function arguments."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def conv_batch_norm_pairs(
    model: nn.Module, example: torch.Tensor
) -> list[tuple[nn.Module, nn.Module]]:
    """(convolution, batch norm) pairs that can be merged: in a forward pass of ``example``
    the convolution's output goes to the batch norm and nowhere else, and each is called once."""
    counter = _UseCounter()
    outputs = counter.watched
    calls: Counter[nn.Module] = Counter()
    candidates = []

    def on_conv(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls[module] += 1
        outputs[id(output)] = (module, output)

    def before_batch_norm(module: nn.Module, args: tuple) -> None:
        calls[module] += 1
        counter.inside += 1
        found = outputs.get(id(args[0]))
        if found is not None and found[1] is args[0]:
            candidates.append((found[0], module, id(args[0])))

    def after_batch_norm(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        counter.inside -= 1

    hooks = []
    for module in model.modules():
        if isinstance(module, _CONVS):
            hooks.append(module.register_forward_hook(on_conv))
        elif isinstance(module, _BATCH_NORMS):
            hooks.append(module.register_forward_pre_hook(before_batch_norm))
            hooks.append(module.register_forward_hook(after_batch_norm))
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return [
        (conv, bn)
        for conv, bn, output in candidates
        if calls[conv] == 1 and calls[bn] == 1 and counter.uses[output] == 0
    ]


Replaced = list[tuple[nn.Module, str, nn.Module]]


def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> Replaced:
    """Merge each pair of :func:`conv_batch_norm_pairs` into one convolution, in place: the
    convolution becomes a new one with the batch norm's scale and shift in its weights and
    bias, the batch norm an identity. Returns the replaced ``(parent, name, module)`` entries
    (:func:`restore` puts them back); the original modules are left unchanged."""
    pairs = conv_batch_norm_pairs(model.eval(), example)
    parent_of = {
        child: (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
    }
    replaced = []
    with torch.no_grad():
        for conv, bn in pairs:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            merged = copy.deepcopy(conv)
            merged.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            merged.bias = nn.Parameter(bias * scale + shift)
            for module, substitute in ((conv, merged), (bn, nn.Identity())):
                parent, name = parent_of[module]
                replaced.append((parent, name, module))
                setattr(parent, name, substitute)
    return replaced


def restore(replaced: Replaced) -> None:
    """Undo :func:`fold_batch_norms`."""
    for parent, name, module in reversed(replaced):
        setattr(parent, name, module)


def prepare_cpu_model(model: nn.Module, feat_dim: int | None = None) -> nn.Module:
    """``model`` (changed in place) made ready for the CPU: batch norms folded into the
    convolutions, channels-last weights, eval mode.

    The folded model's embeddings of a random input of another length than the one that found
    the pairs are compared with the original's; should folding change them (control flow the
    first pass did not take), it is undone, with a warning. A model that gives no finite
    embedding of these inputs (or fails on them) is left unfolded: nothing could check a fold.
    """
    feat_dim = int(feat_dim or getattr(model, "feat_dim", 80))
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, _EXAMPLE_FRAMES, feat_dim, generator=generator)
    check = torch.randn(1, _CHECK_FRAMES, feat_dim, generator=generator)
    model.eval()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pooling statistics of too short an input
            expected = model(check)
        checkable = bool(torch.isfinite(expected).all())
        replaced = fold_batch_norms(model, example) if checkable else []
    except Exception:  # e.g. a model that needs longer inputs: it runs as it is
        checkable = False
    if not checkable:
        return model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        actual = model(check)
    cosine = torch.nn.functional.cosine_similarity(expected, actual).min().item()
    if not cosine >= _FOLD_MIN_COSINE:
        restore(replaced)
        warnings.warn(
            f"folding batch norms into convolutions changed {type(model).__name__}'s "
            f"embeddings (cosine {cosine:.6f}); running it unfolded",
            stacklevel=2,
        )
    return model.to(memory_format=torch.channels_last)


def reuse_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from its heap and keep freed memory for reuse
    instead of mapping fresh pages for every large tensor (process-wide; the memory stays
    with the process). Returns False where the C library has no ``mallopt`` (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    for size in _KEEP_BYTES:
        if mallopt(_M_MMAP_THRESHOLD, size) and mallopt(_M_TRIM_THRESHOLD, size):
            return True
    return False


# --------------------------------------------------------------------------- bfloat16


def bf16_unsupported_reason() -> str | None:
    """Why bfloat16 inference is refused on this machine's CPU, or None when it is supported."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn), which runs bfloat16 on the CPU"
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if not (has_bf16 or has_amx):
        return (
            "this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): bfloat16 would be "
            "emulated, slower than float32; use float32 or an int8 ONNX model"
        )
    return None


def require_bf16() -> None:
    """Raise :class:`ConfigError` saying why when this CPU cannot run bfloat16 inference."""
    reason = bf16_unsupported_reason()
    if reason is not None:
        raise ConfigError(f"bf16 inference refused: {reason}")


# --------------------------------------------------------------------------- ONNX Runtime


def onnx_session_options(num_threads: int | None = None):
    """ONNX Runtime session options for embedding on the CPU: all graph optimisations,
    ``num_threads`` threads inside an operator (default: ONNX Runtime's, one per core), one
    operator at a time (the graph is a chain), threads that sleep rather than spin when idle."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if num_threads:
        options.intra_op_num_threads = num_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
