"""ECAPA-TDNN speaker-embedding network (Desplanques et al., Interspeech 2020).

Architecture (fbank ``(batch, frames, feat_dim)`` -> embedding ``(batch, embedding_size)``), with
``C = channels``:

1. A TDNN block (convolution, ReLU, batch norm) with kernel 5 from ``feat_dim`` to ``C[0]``.
2. Three **SE-Res2Net blocks** (kernel 3, dilation 2, 3, 4): 1x1 TDNN, a Res2Net block that
   splits the channels into ``res2net_scale`` groups processed hierarchically (each group's
   convolution also sees the previous group's output), 1x1 TDNN, squeeze-excitation channel
   gating, plus a residual connection.
3. **Multi-layer feature aggregation**: the outputs of the three SE-Res2Net blocks are
   concatenated and fused by a 1x1 TDNN block to ``C[-1]`` channels.
4. **Attentive statistics pooling** with global context: per-channel attention weights over
   time are computed from the frame features concatenated with the utterance mean and standard
   deviation; the attention-weighted mean and standard deviation are concatenated.
5. Batch norm, then a 1x1 convolution to ``embedding_size``.

Every convolution pads its input with *reflection* to keep the frame count ("same" padding).
Module and parameter names follow the reference 3D-Speaker implementation (itself derived
from SpeechBrain's layout), so its released checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speakerlab.models import ModelSpec, Shapes

# Floor of the pooled variance: keeps sqrt and its gradient finite on constant inputs.
VARIANCE_FLOOR = 1e-12


class SameConv1d(nn.Module):
    """Stride-1 ``nn.Conv1d`` (child ``conv``) with reflection padding that keeps the length.

    Pads ``dilation * (kernel_size - 1) // 2`` frames on each side, as the reference does.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)
        self.padding = dilation * (kernel_size - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding > 0:
            x = F.pad(x, (self.padding, self.padding), mode="reflect")
        return self.conv(x)


class BatchNorm(nn.Module):
    """``nn.BatchNorm1d`` under a child named ``norm`` (the reference's key layout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class TDNNBlock(nn.Module):
    """Same-padded convolution, ReLU, batch norm (in that order)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv = SameConv1d(in_channels, out_channels, kernel_size, dilation)
        self.activation = nn.ReLU()
        self.norm = BatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.activation(self.conv(x)))


class Res2NetBlock(nn.Module):
    """Hierarchical multi-scale convolution over ``scale`` channel groups.

    Group 0 passes through; group 1 goes through TDNN block 0; group ``i > 1`` goes through
    TDNN block ``i - 1`` after adding the previous group's output.
    """

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(
            TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.chunk(x, self.scale, dim=1)
        outputs = [groups[0]]
        previous = self.blocks[0](groups[1])
        outputs.append(previous)
        for block, group in zip(self.blocks[1:], groups[2:]):
            previous = block(group + previous)
            outputs.append(previous)
        return torch.cat(outputs, dim=1)


class SEBlock(nn.Module):
    """Squeeze-excitation: scale each channel by a sigmoid gate computed from its time mean."""

    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = SameConv1d(channels, se_channels, 1)
        self.conv2 = SameConv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=-1, keepdim=True)
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(squeezed))))
        return x * gate


class SERes2NetBlock(nn.Module):
    """1x1 TDNN -> Res2Net -> 1x1 TDNN -> SE, plus a residual (1x1-projected when widths differ)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        res2net_scale: int,
        se_channels: int,
        kernel_size: int,
        dilation: int,
    ) -> None:
        super().__init__()
        self.tdnn1 = TDNNBlock(in_channels, out_channels, 1)
        self.res2net_block = Res2NetBlock(out_channels, res2net_scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(out_channels, out_channels, 1)
        self.se_block = SEBlock(out_channels, se_channels)
        self.shortcut = (
            SameConv1d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        out = self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))
        return out + residual


def weighted_mean_std(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``x`` over time under weights summing to one over time.

    Args:
        x: ``(batch, channels, frames)``.
        weights: broadcastable to ``x``.

    Returns:
        ``(mean, std)``, each ``(batch, channels)``; the variance is floored at ``VARIANCE_FLOOR``.
    """
    mean = (weights * x).sum(dim=-1)
    variance = (weights * (x - mean.unsqueeze(-1)).pow(2)).sum(dim=-1)
    return mean, variance.clamp(min=VARIANCE_FLOOR).sqrt()


class AttentiveStatisticsPooling(nn.Module):
    """Channel-dependent attentive statistics pooling.

    With ``global_context`` the attention network sees ``[x, mean(x), std(x)]`` (utterance
    statistics repeated over time). Output: ``(batch, 2 * channels, 1)`` = ``[mean, std]``.
    """

    def __init__(self, channels: int, attention_channels: int, global_context: bool = True) -> None:
        super().__init__()
        self.global_context = global_context
        in_channels = channels * 3 if global_context else channels
        self.tdnn = TDNNBlock(in_channels, attention_channels, 1)
        self.conv = SameConv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention_input = x
        if self.global_context:
            uniform = torch.ones_like(x[:, :1, :]) / x.shape[-1]
            mean, std = weighted_mean_std(x, uniform)
            frames = x.shape[-1]
            attention_input = torch.cat(
                [
                    x,
                    mean.unsqueeze(-1).expand(-1, -1, frames),
                    std.unsqueeze(-1).expand(-1, -1, frames),
                ],
                dim=1,
            )
        logits = self.conv(torch.tanh(self.tdnn(attention_input)))
        mean, std = weighted_mean_std(x, F.softmax(logits, dim=-1))
        return torch.cat([mean, std], dim=1).unsqueeze(-1)


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN speaker-embedding network.

    Args:
        feat_dim: fbank bins per frame.
        embedding_size: embedding dimension.
        channels: widths of the first TDNN block, the three SE-Res2Net blocks and the
            multi-layer aggregation block (the 3D-Speaker recipe uses
            ``[1024, 1024, 1024, 1024, 3072]``).
        kernel_sizes, dilations: per block, same length as ``channels``.
        attention_channels: hidden width of the attentive pooling.
        res2net_scale: channel groups of each Res2Net block (>= 2, must divide the block widths).
        se_channels: bottleneck width of the squeeze-excitation gates.
        global_context: feed utterance statistics into the pooling attention.

    ``forward`` maps fbank ``(batch, frames, feat_dim)`` to ``(batch, embedding_size)``.
    """

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 192,
        channels: Sequence[int] = (512, 512, 512, 512, 1536),
        kernel_sizes: Sequence[int] = (5, 3, 3, 3, 1),
        dilations: Sequence[int] = (1, 2, 3, 4, 1),
        attention_channels: int = 128,
        res2net_scale: int = 8,
        se_channels: int = 128,
        global_context: bool = True,
    ) -> None:
        super().__init__()
        channels, kernel_sizes, dilations = list(channels), list(kernel_sizes), list(dilations)
        if len(channels) < 3 or not len(channels) == len(kernel_sizes) == len(dilations):
            raise ValueError(
                "ECAPATDNN needs channels, kernel_sizes and dilations of one length "
                f">= 3, got {channels}, {kernel_sizes}, {dilations}"
            )
        if res2net_scale < 2 or any(width % res2net_scale for width in channels[1:-1]):
            raise ValueError(
                f"res2net_scale={res2net_scale} must be >= 2 and divide the "
                f"SE-Res2Net widths {channels[1:-1]}"
            )
        self.feat_dim = feat_dim
        self.embedding_size = embedding_size
        self.blocks = nn.ModuleList(
            [TDNNBlock(feat_dim, channels[0], kernel_sizes[0], dilations[0])]
        )
        for index in range(1, len(channels) - 1):
            self.blocks.append(
                SERes2NetBlock(
                    channels[index - 1],
                    channels[index],
                    res2net_scale,
                    se_channels,
                    kernel_sizes[index],
                    dilations[index],
                )
            )
        self.mfa = TDNNBlock(sum(channels[1:-1]), channels[-1], kernel_sizes[-1], dilations[-1])
        self.asp = AttentiveStatisticsPooling(channels[-1], attention_channels, global_context)
        self.asp_bn = BatchNorm(channels[-1] * 2)
        self.fc = SameConv1d(channels[-1] * 2, embedding_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed fbank ``(batch, frames, feat_dim)`` -> ``(batch, embedding_size)``."""
        if not torch.jit.is_tracing() and (x.dim() != 3 or x.shape[-1] != self.feat_dim):
            raise ValueError(
                f"ECAPATDNN expects fbank of shape (batch, frames, {self.feat_dim}), "
                f"got {tuple(x.shape)}"
            )
        hidden = self.blocks[0](x.transpose(1, 2))
        block_outputs = []
        for block in self.blocks[1:]:
            hidden = block(hidden)
            block_outputs.append(hidden)
        aggregated = self.mfa(torch.cat(block_outputs, dim=1))
        pooled = self.asp_bn(self.asp(aggregated))
        return self.fc(pooled).squeeze(-1)


def ecapa_tdnn_kwargs(shapes: Shapes) -> dict[str, Any]:
    """ECAPA-TDNN constructor arguments giving these state-dict shapes (three SE-Res2Net blocks,
    as in every released model: the dilations of another count are not in the weights)."""
    block_widths = [shapes["blocks.0.conv.conv.weight"][0]] + [
        shapes[f"blocks.{i}.tdnn1.conv.conv.weight"][0] for i in (1, 2, 3)
    ]
    # A Res2Net block of scale s convolves s - 1 of its s channel groups.
    res2net_convs = [
        k
        for k in shapes
        if re.fullmatch(r"blocks\.1\.res2net_block\.blocks\.\d+\.conv\.conv\.weight", k)
    ]
    return {
        "feat_dim": shapes["blocks.0.conv.conv.weight"][1],
        "embedding_size": shapes["fc.conv.weight"][0],
        "channels": block_widths + [shapes["mfa.conv.conv.weight"][0]],
        "attention_channels": shapes["asp.tdnn.conv.conv.weight"][0],
        "res2net_scale": len(res2net_convs) + 1,
        "se_channels": shapes["blocks.1.se_block.conv1.conv.weight"][0],
    }


SPEC = ModelSpec(
    name="ecapa_tdnn",
    build=ECAPATDNN,
    signature_key="asp_bn.norm.weight",
    kwargs_from_shapes=ecapa_tdnn_kwargs,
)
