"""ERes2Net: Res2Net speaker embeddings with local and global feature fusion.

ERes2Net (Chen et al., "An Enhanced Res2Net with Local and Global Feature Fusion for Speaker
Verification", Interspeech 2023) treats the fbank matrix as a one-channel image
``(freq, frames)`` and runs a ResNet-34-like 2-D network over it:

* stem: 3x3 convolution (``m_channels`` filters) + batch norm + ReLU;
* four stages of [3, 4, 6, 3] Res2Net bottleneck blocks (expansion 2, base width 32, scale 2)
  with ``m_channels * (1, 2, 4, 8)`` planes; stages 2-4 halve frequency and time;
* local feature fusion: inside the blocks of stages 3 and 4, the Res2Net split branches are
  merged with attentional feature fusion (AFF) instead of a plain sum;
* global feature fusion: bottom-up, the output of each stage is downsampled by a strided 3x3
  convolution and fused (AFF) with the output of the next stage, so that the final map mixes
  all four scales;
* temporal statistics pooling (mean and standard deviation over time for every
  channel/frequency position) and one linear embedding layer.

AFF of two maps ``x`` and ``y``: ``a = BN(Conv1x1(SiLU(BN(Conv1x1([x; y])))))``,
``w = 1 + tanh(a)``, output ``x * w + y * (2 - w)``.

Inside the blocks (not in the stem) the reference caps the ReLU at 20; so do we, since the
released checkpoints were trained that way.

State-dict key names and shapes are those of the 3D-Speaker reference implementation, so its
released checkpoints load with ``strict=True``. The building blocks here are shared with
:mod:`speakerlab.models.eres2netv2`.
"""

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speakerlab.models import ModelSpec, Shapes
from speakerlab.models.pooling import TemporalStatsPool

# Residual blocks in each of the four stages (ResNet-34 depth); ERes2Net takes others as
# ``num_blocks`` (shallower models for quick experiments).
BLOCKS_PER_STAGE = (3, 4, 6, 3)
STAGE_STRIDES = (1, 2, 2, 2)
# Stages (1-based) whose blocks merge their Res2Net branches with AFF.
LOCALLY_FUSED_STAGES = (3, 4)
# Upper bound of the ReLU used inside the residual blocks.
BLOCK_RELU_CAP = 20.0


def capped_relu() -> nn.Module:
    """ReLU clipped to [0, BLOCK_RELU_CAP], as in the reference blocks."""
    return nn.Hardtanh(0.0, BLOCK_RELU_CAP)


def halved_size(size: int, times: int) -> int:
    """Length of an axis after ``times`` stride-2 convolutions (3x3 with padding 1, or 1x1)."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


class AttentionalFeatureFusion(nn.Module):
    """Attentional feature fusion (AFF) of two equally shaped maps.

    A bottleneck of two 1x1 convolutions (reduction ``reduction``) looks at both inputs and
    yields per-element weights ``w`` in (0, 2): output ``x * w + y * (2 - w)``.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = channels // reduction
        # Indices 0-4 are the reference key names (local_att.{0,1,3,4}).
        self.local_att = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, kernel_size=1),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = 1.0 + torch.tanh(self.local_att(torch.cat((x, y), dim=1)))
        return x * weight + y * (2.0 - weight)


class Res2NetBottleneck(nn.Module):
    """Res2Net bottleneck block.

    1x1 convolution (carrying the block's stride) to ``scale * width`` channels, split into
    ``scale`` groups of ``width = planes * base_width // 64`` channels; group ``i`` is combined
    with the output of group ``i - 1`` (sum, or AFF when ``fuse_branches``), then passes a
    3x3 convolution + BN + capped ReLU. The group outputs are concatenated, projected by a
    1x1 convolution to ``planes * expansion`` channels and added to the shortcut.
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        base_width: int = 32,
        scale: int = 2,
        expansion: int = 2,
        fuse_branches: bool = False,
    ) -> None:
        super().__init__()
        self.width = planes * base_width // 64
        self.out_channels = planes * expansion
        inner = self.width * scale
        self.conv1 = nn.Conv2d(in_channels, inner, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.convs = nn.ModuleList(
            nn.Conv2d(self.width, self.width, kernel_size=3, padding=1, bias=False)
            for _ in range(scale)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(self.width) for _ in range(scale))
        self.fuse_models = (
            nn.ModuleList(AttentionalFeatureFusion(self.width) for _ in range(scale - 1))
            if fuse_branches
            else None
        )
        self.conv3 = nn.Conv2d(inner, self.out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.out_channels)
        self.relu = capped_relu()
        # Projection shortcut whenever the shape changes; an empty Sequential is the identity.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != self.out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, self.out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.out_channels),
            )

    def _merge(self, index: int, previous: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Combine group ``index`` with the previous group's output."""
        if self.fuse_models is None:
            return previous + group
        return self.fuse_models[index - 1](previous, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, dim=1)
        branch_outputs = []
        branch = groups[0]
        for index, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            if index > 0:
                branch = self._merge(index, branch, groups[index])
            branch = self.relu(bn(conv(branch)))
            branch_outputs.append(branch)
        out = self.bn3(self.conv3(torch.cat(branch_outputs, dim=1)))
        return self.relu(out + self.shortcut(x))


def strided_downsample(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 stride-2 convolution bringing an earlier stage to the next stage's shape."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)


class Res2NetBackbone(nn.Module):
    """Stem and the four Res2Net stages shared by ERes2Net and ERes2NetV2.

    Registers ``conv1``, ``bn1`` and ``layer1``..``layer4``; stage ``k`` has
    ``m_channels * 2**(k-1)`` planes and outputs ``expansion`` times as many channels.
    Subclasses add the global fusion, pooling and embedding layers.
    """

    def __init__(
        self,
        feat_dim: int,
        m_channels: int,
        base_width: int,
        scale: int,
        expansion: int,
        num_blocks: Sequence[int] = BLOCKS_PER_STAGE,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or any(int(n) < 1 for n in num_blocks):
            raise ValueError(
                f"num_blocks must be four positive block counts, got {list(num_blocks)}"
            )
        self.feat_dim = feat_dim
        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.stage_channels = []
        in_channels = m_channels
        for stage, (stage_blocks, stride) in enumerate(zip(num_blocks, STAGE_STRIDES), 1):
            blocks = []
            for block_index in range(int(stage_blocks)):
                block = Res2NetBottleneck(
                    in_channels,
                    m_channels * 2 ** (stage - 1),
                    stride=stride if block_index == 0 else 1,
                    base_width=base_width,
                    scale=scale,
                    expansion=expansion,
                    fuse_branches=stage in LOCALLY_FUSED_STAGES,
                )
                blocks.append(block)
                in_channels = block.out_channels
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            self.stage_channels.append(in_channels)
        # Frequency bins left after the three stride-2 stages.
        self.final_freq_bins = halved_size(feat_dim, sum(s == 2 for s in STAGE_STRIDES))

    def stem(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, frames, feat_dim) fbank -> stem output (batch, m_channels, feat_dim, frames)."""
        # Shapes are checked eagerly only: under the ONNX/JIT tracer the check would be
        # recorded as a constant and trigger a warning.
        if not torch.jit.is_tracing() and (
            features.dim() != 3 or features.shape[-1] != self.feat_dim
        ):
            raise ValueError(
                f"{type(self).__name__} expects fbank of shape (batch, frames, {self.feat_dim}), "
                f"got {tuple(features.shape)}"
            )
        image = features.transpose(1, 2).unsqueeze(1)  # new view; the input is left untouched
        return F.relu(self.bn1(self.conv1(image)))


class ERes2Net(Res2NetBackbone):
    """ERes2Net speaker embedding model.

    Args:
        feat_dim: fbank bins per frame.
        embedding_size: size of the output embedding.
        m_channels: stem width; 32 is the "base" model, 64 the "large" one.
        num_blocks: residual blocks per stage (the released models: 3, 4, 6, 3).

    Input ``(batch, frames, feat_dim)`` fbank, output ``(batch, embedding_size)`` embeddings
    (not normalised).
    """

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 192,
        m_channels: int = 32,
        num_blocks: Sequence[int] = BLOCKS_PER_STAGE,
    ) -> None:
        super().__init__(
            feat_dim, m_channels, base_width=32, scale=2, expansion=2, num_blocks=num_blocks
        )
        self.embedding_size = embedding_size
        c1, c2, c3, c4 = self.stage_channels
        self.layer1_downsample = strided_downsample(c1, c2)
        self.layer2_downsample = strided_downsample(c2, c3)
        self.layer3_downsample = strided_downsample(c3, c4)
        self.fuse_mode12 = AttentionalFeatureFusion(c2)
        self.fuse_mode123 = AttentionalFeatureFusion(c3)
        self.fuse_mode1234 = AttentionalFeatureFusion(c4)
        self.pool = TemporalStatsPool()
        self.seg_1 = nn.Linear(2 * c4 * self.final_freq_bins, embedding_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out1 = self.layer1(self.stem(features))
        out2 = self.layer2(out1)
        fused = self.fuse_mode12(out2, self.layer1_downsample(out1))
        out3 = self.layer3(out2)
        fused = self.fuse_mode123(out3, self.layer2_downsample(fused))
        out4 = self.layer4(out3)
        fused = self.fuse_mode1234(out4, self.layer3_downsample(fused))
        return self.seg_1(self.pool(fused))


def feat_dim_from_shapes(shapes: Shapes) -> int:
    """fbank bins per frame of a Res2Net model, from the width of its pooled statistics.

    The weights fix only the frequency bins left after the stride-2 stages, so ``feat_dim`` is
    known up to that factor (8); the multiple is returned (80 for every released model).
    """
    pooled = shapes["seg_1.weight"][1]  # 2 statistics x final channels x final frequency bins
    final_channels = shapes["layer4.0.conv3.weight"][0]
    return pooled // (2 * final_channels) * 2 ** sum(s == 2 for s in STAGE_STRIDES)


def blocks_per_stage(shapes: Shapes) -> tuple[int, ...]:
    """Residual blocks in each of the four stages of a Res2Net state dict."""
    return tuple(
        sum(1 for key in shapes if re.fullmatch(rf"layer{stage}\.\d+\.conv1\.weight", key))
        for stage in range(1, 5)
    )


def eres2net_kwargs(shapes: Shapes) -> dict[str, Any]:
    """ERes2Net constructor arguments giving these state-dict shapes (``num_blocks`` only when it
    is not the released depth, so released checkpoints read back as plain base/large models)."""
    kwargs: dict[str, Any] = {
        "m_channels": shapes["conv1.weight"][0],
        "embedding_size": shapes["seg_1.weight"][0],
        "feat_dim": feat_dim_from_shapes(shapes),
    }
    num_blocks = blocks_per_stage(shapes)
    if num_blocks != BLOCKS_PER_STAGE:
        kwargs["num_blocks"] = list(num_blocks)
    return kwargs


SPEC = ModelSpec(
    name="eres2net",
    build=ERes2Net,
    signature_key="layer1_downsample.weight",
    kwargs_from_shapes=eres2net_kwargs,
)
