"""ERes2NetV2: a wider, lighter-fused ERes2Net.

ERes2NetV2 (3D-Speaker, 2024) keeps ERes2Net's 2-D ResNet layout -- a 3x3 stem, four stages
of [3, 4, 6, 3] Res2Net bottleneck blocks with ``m_channels * (1, 2, 4, 8)`` planes, stages
2-4 halving frequency and time, and attentional feature fusion (AFF) between the Res2Net
branches of stages 3 and 4 -- but changes the trade-offs:

* the blocks are wider and shallower in scale: ``base_width`` 26, ``scale`` 2 and a
  configurable ``expansion`` (2), with a default stem width of 64;
* global fusion is reduced to one bottom-up step: the stage-3 output is downsampled by a
  strided 3x3 convolution (``layer3_ds``) and fused with the stage-4 output (``fuse34``);
* temporal statistics pooling and one linear embedding layer, as in ERes2Net.

State-dict key names and shapes are those of the 3D-Speaker reference implementation. The
building blocks come from :mod:`speakerlab.models.eres2net`.
"""

import re
from typing import Any

import torch
from torch import nn

from speakerlab.models import ModelSpec, Shapes
from speakerlab.models.eres2net import (
    AttentionalFeatureFusion,
    Res2NetBackbone,
    feat_dim_from_shapes,
    strided_downsample,
)
from speakerlab.models.pooling import TemporalStatsPool

# Res2Net group width per 64 planes of the reference model.
REFERENCE_BASE_WIDTH = 26


class ERes2NetV2(Res2NetBackbone):
    """ERes2NetV2 speaker embedding model.

    Args:
        feat_dim: fbank bins per frame.
        embedding_size: size of the output embedding.
        m_channels: stem width (planes of stage 1).
        base_width: Res2Net group width per 64 planes.
        scale: number of Res2Net groups per block.
        expansion: output channels of a block per plane.

    Input ``(batch, frames, feat_dim)`` fbank, output ``(batch, embedding_size)`` embeddings
    (not normalised).
    """

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 192,
        m_channels: int = 64,
        base_width: int = REFERENCE_BASE_WIDTH,
        scale: int = 2,
        expansion: int = 2,
    ) -> None:
        super().__init__(
            feat_dim, m_channels, base_width=base_width, scale=scale, expansion=expansion
        )
        self.embedding_size = embedding_size
        _, _, c3, c4 = self.stage_channels
        self.layer3_ds = strided_downsample(c3, c4)
        self.fuse34 = AttentionalFeatureFusion(c4)
        self.pool = TemporalStatsPool()
        self.seg_1 = nn.Linear(2 * c4 * self.final_freq_bins, embedding_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out3 = self.layer3(self.layer2(self.layer1(self.stem(features))))
        out4 = self.layer4(out3)
        return self.seg_1(self.pool(self.fuse34(out4, self.layer3_ds(out3))))


def res2net_base_width(m_channels: int, split_widths: list[int]) -> int:
    """The base width giving ``planes * base_width // 64`` channels per split in each of the four
    stages (planes = m, 2m, 4m, 8m); the reference value when it fits, since for small
    ``m_channels`` several values do."""
    # m * base_width // 64 == split_widths[0] bounds base_width by 64 * (width + 1) / m.
    largest = 64 * (split_widths[0] + 1) // m_channels
    for base_width in (REFERENCE_BASE_WIDTH, *range(1, largest + 1)):
        widths = [m_channels * 2**i * base_width // 64 for i in range(4)]
        if widths == split_widths:
            return base_width
    raise ValueError(f"no Res2Net base width gives split widths {split_widths}")


def eres2netv2_kwargs(shapes: Shapes) -> dict[str, Any]:
    """ERes2NetV2 constructor arguments giving these state-dict shapes."""
    m_channels = shapes["conv1.weight"][0]
    split_widths = [shapes[f"layer{i}.0.convs.0.weight"][0] for i in range(1, 5)]
    return {
        "m_channels": m_channels,
        "embedding_size": shapes["seg_1.weight"][0],
        "feat_dim": feat_dim_from_shapes(shapes),
        "base_width": res2net_base_width(m_channels, split_widths),
        "scale": sum(1 for key in shapes if re.fullmatch(r"layer1\.0\.convs\.\d+\.weight", key)),
        "expansion": shapes["layer1.0.conv3.weight"][0] // m_channels,
    }


SPEC = ModelSpec(
    name="eres2netv2",
    build=ERes2NetV2,
    signature_key="fuse34.local_att.0.weight",
    kwargs_from_shapes=eres2netv2_kwargs,
)
