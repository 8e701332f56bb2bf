"""CAM++: a densely connected TDNN with context-aware masking (Wang et al., Interspeech 2023).

Architecture (fbank ``(batch, frames, feat_dim)`` -> embedding ``(batch, embedding_size)``):

1. **Front-end convolution module (FCM)** (``head``): the fbank is treated as a one-channel image
   ``(frequency, time)``. A 3x3 convolution, two stages of two 2-D residual blocks and a final
   3x3 convolution, each stage halving the *frequency* axis only, give 32 channels x
   ``feat_dim / 8`` bands, flattened into ``32 * feat_dim / 8`` channels per frame.
2. **D-TDNN backbone** (``xvector``): a kernel-5, stride-2 TDNN layer (halves the frame rate),
   then three densely connected blocks of 12, 24 and 16 layers (dilation 1, 2, 2). Every layer
   sees the concatenation of the block input and all earlier layer outputs, squeezes it with
   BN-ReLU-1x1 convolution to ``bn_size * growth_rate`` channels, and adds ``growth_rate`` new
   channels through a **context-aware masking (CAM)** layer: a kernel-3 convolution whose
   output is gated by a sigmoid mask computed from the utterance mean plus the mean of the
   surrounding 100-frame segment. A BN-ReLU-1x1 transit layer after each block halves the
   channel count.
3. **Pooling and embedding**: BN-ReLU, mean and unbiased standard deviation over time, a 1x1
   convolution to ``embedding_size`` and a batch norm without affine parameters.

Module and parameter names follow the reference 3D-Speaker implementation, so its released
checkpoints load with ``strict=True``. All operations are tensor operations on shapes (no
Python branching on tensor values), so the model exports with dynamic batch and frame axes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speakerlab.models import ModelSpec, Shapes
from speakerlab.models.pooling import TemporalStatsPool

# Dense-block layout of the reference model: (layers, kernel size, dilation) per block.
DENSE_BLOCKS = ((12, 3, 1), (24, 3, 2), (16, 3, 2))
# Length (in frames after the stride-2 TDNN layer) of the segments the CAM masks average over.
CAM_SEGMENT_FRAMES = 100
FCM_CHANNELS = 32
# Stride-2 convolutions along frequency in the FCM: its two stages and its final convolution.
FCM_FREQUENCY_HALVINGS = 3


def segment_average(x: torch.Tensor, segment_frames: int) -> torch.Tensor:
    """Replace every frame by the mean of its non-overlapping ``segment_frames``-long segment.

    Segments start at frame 0; the last one may be shorter and is averaged over the frames it
    has. Equal to ``avg_pool1d(kernel=stride=segment_frames, ceil_mode=True)`` expanded back
    to the input length, written with pad/reshape and an index gather so that the number of
    segments follows a dynamic frame axis in exported (ONNX, ``torch.export``) graphs.

    Args:
        x: ``(batch, channels, frames)``.
        segment_frames: segment length in frames.

    Returns:
        Tensor with the shape of ``x``.
    """
    frames = x.shape[-1]
    num_segments = (frames + segment_frames - 1) // segment_frames
    padded = F.pad(x, (0, num_segments * segment_frames - frames))
    sums = padded.unflatten(-1, (num_segments, segment_frames)).sum(dim=-1)
    starts = torch.arange(num_segments, device=x.device) * segment_frames
    counts = (frames - starts).clamp(max=segment_frames).to(x.dtype)
    means = sums / counts
    segment_of_frame = torch.arange(frames, device=x.device) // segment_frames
    return means.index_select(-1, segment_of_frame)


def batchnorm_relu(channels: int) -> nn.Sequential:
    """BatchNorm1d followed by ReLU, with the reference's child names (``batchnorm``, ``relu``)."""
    return nn.Sequential(
        OrderedDict([("batchnorm", nn.BatchNorm1d(channels)), ("relu", nn.ReLU())])
    )


class ResidualBlock2d(nn.Module):
    """Two 3x3 convolutions with a residual connection; ``stride`` applies to frequency only."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, 3, stride=(stride, 1), padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=(stride, 1), bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FrontEndConvModule(nn.Module):
    """The FCM: 2-D residual network over ``(frequency, time)``, flattened to a 1-D sequence.

    Input ``(batch, feat_dim, frames)`` -> ``(batch, out_channels, frames)`` with
    ``out_channels = channels * ceil(feat_dim / 8)`` (frequency is halved three times).
    """

    def __init__(
        self, feat_dim: int, channels: int = FCM_CHANNELS, blocks_per_stage: int = 2
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = self._stage(channels, blocks_per_stage)
        self.layer2 = self._stage(channels, blocks_per_stage)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        bands = feat_dim
        for _ in range(FCM_FREQUENCY_HALVINGS):  # a stride-2, padding-1, kernel-3 conv: ceil(n/2)
            bands = (bands + 1) // 2
        self.out_channels = channels * bands

    @staticmethod
    def _stage(channels: int, num_blocks: int) -> nn.Sequential:
        """A stage whose first block halves the frequency axis."""
        strides = [2] + [1] * (num_blocks - 1)
        return nn.Sequential(*[ResidualBlock2d(channels, channels, stride) for stride in strides])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn2(self.conv2(out)))
        return out.flatten(start_dim=1, end_dim=2)


class TDNNLayer(nn.Module):
    """Convolution (no bias, "same"-style zero padding) followed by BN-ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
        )
        self.nonlinear = batchnorm_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class ContextAwareMasking(nn.Module):
    """CAM layer: a local convolution gated by a mask from utterance- and segment-level context.

    ``y = conv_local(x) * sigmoid(W2 relu(W1 (mean_t(x) + segment_mean(x))))``
    """

    def __init__(
        self,
        bn_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        reduction: int = 2,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(
            bn_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // reduction, 1)
        self.linear2 = nn.Conv1d(bn_channels // reduction, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear_local(x)
        context = x.mean(dim=-1, keepdim=True) + segment_average(x, CAM_SEGMENT_FRAMES)
        mask = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return local * mask


class DenseTDNNLayer(nn.Module):
    """One D-TDNN layer: BN-ReLU-1x1 bottleneck, BN-ReLU, then a CAM layer adding new channels."""

    def __init__(
        self, in_channels: int, growth_rate: int, bn_channels: int, kernel_size: int, dilation: int
    ) -> None:
        super().__init__()
        self.nonlinear1 = batchnorm_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = batchnorm_relu(bn_channels)
        self.cam_layer = ContextAwareMasking(bn_channels, growth_rate, kernel_size, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck = self.linear1(self.nonlinear1(x))
        return self.cam_layer(self.nonlinear2(bottleneck))


class DenseTDNNBlock(nn.Module):
    """Densely connected layers ``tdnnd1..N``: each one's output is appended to its input.

    Output channels: ``in_channels + num_layers * growth_rate``.
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_channels: int,
        kernel_size: int,
        dilation: int,
    ) -> None:
        super().__init__()
        for index in range(num_layers):
            layer = DenseTDNNLayer(
                in_channels + index * growth_rate, growth_rate, bn_channels, kernel_size, dilation
            )
            self.add_module(f"tdnnd{index + 1}", layer)
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    """BN-ReLU then a 1x1 convolution without bias (between dense blocks)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = batchnorm_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class EmbeddingLayer(nn.Module):
    """Pooled statistics ``(batch, channels)`` -> 1x1 convolution -> BatchNorm without affine."""

    def __init__(self, in_channels: int, embedding_size: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, embedding_size, 1, bias=False)
        self.nonlinear = nn.Sequential(
            OrderedDict(
                [
                    ("batchnorm", nn.BatchNorm1d(embedding_size, affine=False)),
                ]
            )
        )

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(stats.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """CAM++ speaker-embedding network.

    Args:
        feat_dim: fbank bins per frame.
        embedding_size: embedding dimension (512 for the 3D-Speaker recipe, 192 for the released
            zh-cn "common" model).
        growth_rate: channels each dense layer adds.
        bn_size: bottleneck width of a dense layer, in multiples of ``growth_rate``.
        init_channels: channels of the first TDNN layer.

    ``forward`` maps fbank ``(batch, frames, feat_dim)`` to ``(batch, embedding_size)``.
    """

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 512,
        growth_rate: int = 32,
        bn_size: int = 4,
        init_channels: int = 128,
    ) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.embedding_size = embedding_size
        self.head = FrontEndConvModule(feat_dim)
        self.xvector = nn.Sequential(
            OrderedDict(
                [
                    (
                        "tdnn",
                        TDNNLayer(self.head.out_channels, init_channels, kernel_size=5, stride=2),
                    ),
                ]
            )
        )
        channels = init_channels
        for index, (num_layers, kernel_size, dilation) in enumerate(DENSE_BLOCKS, start=1):
            block = DenseTDNNBlock(
                num_layers, channels, growth_rate, bn_size * growth_rate, kernel_size, dilation
            )
            self.xvector.add_module(f"block{index}", block)
            self.xvector.add_module(
                f"transit{index}", TransitLayer(block.out_channels, block.out_channels // 2)
            )
            channels = block.out_channels // 2
        self.xvector.add_module("out_nonlinear", batchnorm_relu(channels))
        # Plain mean and unbiased standard deviation over time: the reference adds no eps.
        self.xvector.add_module("stats", TemporalStatsPool(eps=0.0, unbiased=True))
        self.xvector.add_module("dense", EmbeddingLayer(channels * 2, embedding_size))
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal 1-D convolutions with zero bias, as the reference initialises them."""
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed fbank ``(batch, frames, feat_dim)`` -> ``(batch, embedding_size)``."""
        if not torch.jit.is_tracing() and (x.dim() != 3 or x.shape[-1] != self.feat_dim):
            raise ValueError(
                f"CAMPPlus expects fbank of shape (batch, frames, {self.feat_dim}), "
                f"got {tuple(x.shape)}"
            )
        return self.xvector(self.head(x.transpose(1, 2)))


def campplus_kwargs(shapes: Shapes) -> dict[str, Any]:
    """CAM++ constructor arguments giving these state-dict shapes.

    The weights fix only the FCM's frequency bands, so ``feat_dim`` is known up to a factor of 8;
    the multiple is returned (80 for the released models).
    """
    growth_rate = shapes["xvector.block1.tdnnd1.cam_layer.linear_local.weight"][0]
    init_channels, fcm_out_channels, _ = shapes["xvector.tdnn.linear.weight"]
    bands = fcm_out_channels // shapes["head.conv2.weight"][0]
    return {
        "feat_dim": bands * 2**FCM_FREQUENCY_HALVINGS,
        "embedding_size": shapes["xvector.dense.linear.weight"][0],
        "growth_rate": growth_rate,
        "bn_size": shapes["xvector.block1.tdnnd1.linear1.weight"][0] // growth_rate,
        "init_channels": init_channels,
    }


SPEC = ModelSpec(
    name="campplus",
    build=CAMPPlus,
    signature_key="xvector.dense.linear.weight",
    kwargs_from_shapes=campplus_kwargs,
)
