"""Released checkpoints: one registry, and ``load_model`` for ids and local files alike.

The released 3D-Speaker models are hosted on ModelScope. They are fetched with the ``modelscope``
package when it is installed and the host is reachable; otherwise the error says how to get the
file by hand, and the downloaded file's path can be passed instead of the id.

Ids are accepted in today's ``iic/...`` spelling and in the hub's former ``damo/...`` one, which
the model cards' own examples still use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from speakerlab.errors import CheckpointError
from speakerlab.fileio import tensors_digest
from speakerlab.models.checkpoint import load_embedding_model, load_embedding_model_spec

# Decision threshold on the cosine score suggested by the ERes2Net-base model card; the card of
# no other released model gives one, so it is the default for all of them (override per call).
MODEL_CARD_THRESHOLD = 0.249
# ModelScope namespace of the released models, and the one they had before (model cards and
# older scripts still name them "damo/..."); both spellings name the same model.
HUB_NAMESPACE = "iic"
FORMER_HUB_NAMESPACES = ("damo",)


@dataclass(frozen=True)
class PretrainedModel:
    """A released checkpoint: where it lives and which architecture it needs."""

    model_id: str
    file_name: str
    model_name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    threshold: float = MODEL_CARD_THRESHOLD
    description: str = ""


PRETRAINED: dict[str, PretrainedModel] = {
    entry.model_id: entry
    for entry in (
        PretrainedModel(
            "iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k",
            "eres2net_base_model.ckpt",
            "eres2net",
            {"m_channels": 32, "embedding_size": 512},
            description="ERes2Net base trained on 3D-Speaker",
        ),
        PretrainedModel(
            "iic/speech_eres2net_large_sv_zh-cn_3dspeaker_16k",
            "eres2net_large_model.ckpt",
            "eres2net",
            {"m_channels": 64, "embedding_size": 512},
            description="ERes2Net large trained on 3D-Speaker",
        ),
        PretrainedModel(
            "iic/speech_ecapa-tdnn_sv_zh-cn_3dspeaker_16k",
            "ecapa-tdnn.ckpt",
            "ecapa_tdnn",
            {"channels": [1024, 1024, 1024, 1024, 3072], "embedding_size": 192},
            description="ECAPA-TDNN (C=1024) trained on 3D-Speaker",
        ),
        PretrainedModel(
            "iic/speech_campplus_sv_zh-cn_16k-common",
            "campplus_cn_common.bin",
            "campplus",
            {"embedding_size": 192},
            description="CAM++ trained on 200k Chinese speakers",
        ),
        PretrainedModel(
            "iic/speech_eres2net_sv_en_voxceleb_16k",
            "pretrained_eres2net.ckpt",
            "eres2net",
            {"m_channels": 32, "embedding_size": 192},
            description="ERes2Net base trained on VoxCeleb",
        ),
        PretrainedModel(
            "iic/speech_eres2netv2_sv_zh-cn_16k-common",
            "pretrained_eres2netv2.ckpt",
            "eres2netv2",
            {"embedding_size": 192},
            description="ERes2NetV2 trained on 200k Chinese speakers",
        ),
    )
}


@dataclass
class LoadedModel:
    """An embedding model in eval mode with what is known about it."""

    model: nn.Module
    name: str
    kwargs: dict[str, Any]
    threshold: float | None
    source: str

    @cached_property
    def weights_digest(self) -> str:
        """SHA-256 of the weights (names, dtypes, shapes, values): the model's identity for
        outputs keyed on content, equal for equal weights whichever file they came from."""
        return tensors_digest(self.model.state_dict())


def released_model(model_id: str) -> PretrainedModel | None:
    """The registry entry that ``model_id`` names in either hub spelling, or None."""
    namespace, slash, name = model_id.partition("/")
    if slash and namespace in FORMER_HUB_NAMESPACES:
        model_id = f"{HUB_NAMESPACE}/{name}"
    return PRETRAINED.get(model_id)


def _known_ids() -> str:
    """The registry ids, for error messages."""
    spellings = "/".join((HUB_NAMESPACE, *FORMER_HUB_NAMESPACES))
    return f"{', '.join(PRETRAINED)} (each also as {spellings}/...)"


def download_pretrained(model_id: str, cache_dir: str | Path | None = None) -> Path:
    """Local path of the checkpoint file of released model ``model_id`` (downloaded if needed)."""
    entry = released_model(model_id)
    if entry is None:
        raise CheckpointError(f"unknown model id {model_id!r}; known ids: {_known_ids()}")
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{model_id}: fetching released models needs the 'modelscope' package "
            f"(pip install modelscope) and access to modelscope.cn; alternatively download "
            f"{entry.file_name} from that model page yourself and pass its path"
        ) from None
    try:
        folder = snapshot_download(
            entry.model_id, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except Exception as err:
        raise CheckpointError(
            f"{model_id}: download failed ({err}); download {entry.file_name} "
            "yourself and pass its path"
        ) from None
    path = Path(folder) / entry.file_name
    if not path.is_file():
        raise CheckpointError(
            f"{model_id}: {entry.file_name} not found in the snapshot at {folder}"
        )
    return path


def load_model(source: str | Path, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load an embedding model from a released model id (either hub spelling) or a local
    checkpoint file (ours or released)."""
    source_str = str(source)
    entry = released_model(source_str)
    if entry is not None:
        path = download_pretrained(entry.model_id, cache_dir)
        model = load_embedding_model(path, entry.model_name, **entry.model_kwargs)
        return LoadedModel(
            model, entry.model_name, dict(entry.model_kwargs), entry.threshold, entry.model_id
        )
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(
            f"{source_str!r} is neither a checkpoint file nor a known model id; "
            f"known ids: {_known_ids()}"
        )
    model, name, kwargs = load_embedding_model_spec(path)
    return LoadedModel(model, name, kwargs, released_threshold(path.name, name, kwargs), source_str)


def released_threshold(
    file_name: str, model_name: str, model_kwargs: dict[str, Any]
) -> float | None:
    """The threshold of the released checkpoint that a local file is, recognised by its file name
    and architecture (a file downloaded by hand keeps its name); None for any other file."""
    for entry in PRETRAINED.values():
        if (
            entry.file_name == file_name
            and entry.model_name == model_name
            and all(model_kwargs.get(key) == value for key, value in entry.model_kwargs.items())
        ):
            return entry.threshold
    return None
