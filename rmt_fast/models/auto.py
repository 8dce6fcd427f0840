"""``AutoRMT``: load any rmt_fast wrapper from a directory without naming its class."""

from __future__ import annotations

import json
import os

from rmt_fast.models.base import BASE_DIR, EXTRA_STATE_KEY, TRAINER_WEIGHTS_NAME, WEIGHTS_NAME, RMTBase
from rmt_fast.models.config import CONFIG_NAME, RMTConfig


def wrapper_classes() -> dict[str, type[RMTBase]]:
    from rmt_fast.models.armt import ARMTForCausalLM
    from rmt_fast.models.decoder import RMTForCausalLM
    from rmt_fast.models.encoder import RMTEncoderForSequenceClassification, RMTEncoderForTokenClassification
    from rmt_fast.models.memory_transformer import MemoryTransformer

    classes = (RMTForCausalLM, ARMTForCausalLM, RMTEncoderForSequenceClassification,
               RMTEncoderForTokenClassification, MemoryTransformer)
    return {cls.__name__: cls for cls in classes}


def _wrapper_in(path: str) -> str | None:
    """The wrapper named by the ``_extra_state`` entry of a safetensors file, if it has one."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        if EXTRA_STATE_KEY not in f.keys():
            return None
        return RMTBase.read_extra_state(f.get_tensor(EXTRA_STATE_KEY))["wrapper"]


def _saved_wrapper(directory: str) -> str:
    """The wrapper class name a directory holds: from the metadata in ``rmt_weights.safetensors``
    (``save_pretrained``) or ``model.safetensors`` (a ``transformers.Trainer`` checkpoint); for
    checkpoints written before that metadata existed, from ``rmt_config.json``'s kind and, for
    encoders, the base model's architecture."""
    for name in (WEIGHTS_NAME, TRAINER_WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            found = _wrapper_in(path)
            if found is not None:
                return found
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise FileNotFoundError(f"{directory} holds neither {CONFIG_NAME} (save_pretrained) nor an "
                                f"rmt_fast {TRAINER_WEIGHTS_NAME} (a transformers.Trainer checkpoint)")
    kind = RMTConfig.load(directory).kind
    if kind in ("decoder", "memory_transformer"):
        return "RMTForCausalLM" if kind == "decoder" else "MemoryTransformer"
    path = os.path.join(directory, BASE_DIR, "config.json")
    with open(path) as f:
        architectures = json.load(f).get("architectures") or []
    for arch in architectures:
        for task in ("TokenClassification", "SequenceClassification"):
            if arch.endswith("For" + task):
                return "RMTEncoderFor" + task
    raise ValueError(f"{path}: cannot tell the encoder wrapper from architectures {architectures}")


class AutoRMT:
    """``AutoRMT.from_pretrained(directory)``: whichever wrapper ``directory`` holds (written by
    ``save_pretrained``, or a ``transformers.Trainer`` checkpoint of one), as transformers'
    ``AutoModel`` does for its models. ``kwargs`` go to that wrapper's ``from_pretrained``."""

    def __init__(self) -> None:
        raise TypeError("AutoRMT is not instantiated: use AutoRMT.from_pretrained(directory)")

    @staticmethod
    def wrapper_class(directory: str | os.PathLike) -> type[RMTBase]:
        name = _saved_wrapper(os.fspath(directory))
        classes = wrapper_classes()
        if name not in classes:
            raise ValueError(f"{directory} holds an unknown wrapper {name!r} (known: {sorted(classes)})")
        return classes[name]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> RMTBase:
        return cls.wrapper_class(directory).from_pretrained(directory, **kwargs)
