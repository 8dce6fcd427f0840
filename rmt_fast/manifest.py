"""Checkpoint manifests and model fingerprints: a flipped bit, a truncated file, a base model
swapped for another of the same shape or an edited config are refused with a message naming the
file, instead of loading silently.

``save_pretrained`` writes ``rmt_manifest.json`` (written last, atomically)::

    {"format": 1, "rmt_fast": "<version>", "config": {... RMTConfig ...},
     "fingerprint": {"base_structure": sha256, "base_weights": sha256, "model_type": ..., ...},
     "files": {"rmt_config.json": {"size": n, "sha256": ...}, "base/model.safetensors": ..., ...}}

``from_pretrained`` verifies it by default (``verify=False`` skips it; a checkpoint without a
manifest, written before manifests existed, loads with a warning). Hashing reads every file once
(SHA-256, ~1 GB/s): negligible next to loading the weights.

A :class:`rmt_fast.streaming.StreamingReader` state carries :func:`model_fingerprint` of the model
that read it, so a state is not resumed on another model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator

import torch

MANIFEST_NAME = "rmt_manifest.json"
FORMAT = 1


class ManifestError(ValueError):
    """A checkpoint does not match its manifest (or the manifest is unreadable)."""


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _hidden_size(config) -> int | None:
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def base_fingerprint(state_dict: dict[str, torch.Tensor], base_config) -> dict:
    """Structure of a base model: SHA-256 over its sorted ``(name, shape, dtype)`` entries plus
    the config's ``model_type``, hidden size and vocabulary size (which are also kept in clear)."""
    entries = sorted((name, list(t.shape), str(t.dtype).removeprefix("torch."))
                     for name, t in state_dict.items())
    info = {"model_type": getattr(base_config, "model_type", None),
            "hidden_size": _hidden_size(base_config),
            "vocab_size": getattr(base_config, "vocab_size", None)}
    return {"base_structure": _sha256_json([entries, info]), **info}


#: tensors up to this many elements are hashed whole by :func:`model_fingerprint`, larger ones
#: through this many evenly spaced elements
FULL_HASH_ELEMENTS = 4096
SAMPLE_ELEMENTS = 1024


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over a model's RMT config, every state-dict entry's name, shape and dtype, and its
    values: whole for tensors of <= :data:`FULL_HASH_ELEMENTS` elements, else
    :data:`SAMPLE_ELEMENTS` evenly spaced ones (exact bytes, so the same on every device).

    Cheap (a few small gathers per tensor, no pass over the weights), it tells two different
    models apart, including two of the same architecture trained differently; a change confined to
    elements outside the sample of every large tensor (editing a few embedding rows) is not seen.
    """
    h = hashlib.sha256()
    config = getattr(model, "rmt_config", None)
    h.update(json.dumps(config.to_dict() if config is not None else None, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if name.endswith("_extra_state") or not isinstance(t, torch.Tensor):
            continue  # metadata (the configs as JSON, incl. transformers' version), not weights
        t = t.detach()
        h.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        if flat.numel() > FULL_HASH_ELEMENTS:
            idx = torch.linspace(0, flat.numel() - 1, SAMPLE_ELEMENTS, device=flat.device).long()
            flat = flat[idx]
        flat = flat.contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


# --- writing -------------------------------------------------------------------------------------
def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rel_files(directory: str, names: list[str]) -> list[str]:
    """``names`` (files or folders relative to ``directory``) expanded to sorted file paths."""
    out = []
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            for root, _, files in os.walk(path):
                out += [os.path.relpath(os.path.join(root, f), directory) for f in files]
        elif os.path.isfile(path):
            out.append(name)
        else:
            raise FileNotFoundError(f"{path}: listed for the manifest but not written")
    return sorted(p.replace(os.sep, "/") for p in out if not p.endswith(".tmp"))


def write_manifest(directory: str | os.PathLike, config_dict: dict, fingerprint: dict,
                   files: list[str]) -> dict:
    """Write ``directory/rmt_manifest.json`` for ``files`` (paths relative to ``directory``;
    folders are expanded), with ``config_dict`` and ``fingerprint``. Returns the manifest.

    ``fingerprint`` gains ``base_weights``: SHA-256 over the hashes of the weight files
    (``*.safetensors``/``*.bin``) under ``base/``, so a base model replaced by another one of the
    same shape is told apart."""
    from rmt_fast import __version__

    directory = os.fspath(directory)
    entries = {}
    for rel in _rel_files(directory, files):
        path = os.path.join(directory, rel)
        entries[rel] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    weights = sorted((rel, e["sha256"]) for rel, e in entries.items() if _is_base_weights(rel))
    manifest = {"format": FORMAT, "rmt_fast": __version__, "config": config_dict,
                "fingerprint": {**fingerprint, "base_weights": _sha256_json(weights)},
                "files": entries}
    _atomic_write_text(os.path.join(directory, MANIFEST_NAME), json.dumps(manifest, indent=1) + "\n")
    return manifest


def _is_base_weights(rel: str) -> bool:
    return rel.startswith("base/") and rel.endswith((".safetensors", ".bin"))


# --- reading and verifying -----------------------------------------------------------------------
def read_json(path: str | os.PathLike, what: str = "JSON file") -> object:
    """``json.load`` of ``path`` with the path in every error (empty, truncated, not UTF-8)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        size = os.path.getsize(path)
        raise ValueError(f"{path}: not a valid {what} ({'empty file' if size == 0 else exc})") from exc


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of ``directory``, or None when there is none."""
    path = os.path.join(os.fspath(directory), MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    manifest = read_json(path, "rmt_fast manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or \
            not isinstance(manifest.get("fingerprint"), dict):
        raise ManifestError(f"{path}: malformed manifest (needs 'files' and 'fingerprint' objects)")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: manifest format {manifest.get('format')!r}, this rmt_fast reads "
                            f"format {FORMAT}")
    return manifest


def _config_diff(saved: dict, now: dict) -> str:
    keys = sorted(set(saved) | set(now))
    diff = [f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != now.get(k, "<absent>")]
    return ", ".join(diff) if diff else "no field differs (the file's formatting does)"


def verify_manifest(directory: str | os.PathLike, config_dict: dict | None = None,
                    fingerprint: dict | None = None, *, missing_ok: bool = True) -> dict | None:
    """Check ``directory`` against its manifest: every listed file present with its size and
    SHA-256, ``config_dict`` (the config as loaded) equal to the saved one, and ``fingerprint``
    entries given equal to the saved ones. Raises :class:`ManifestError` naming the file and what
    differs. Without a manifest: a warning (``missing_ok``) or a ManifestError. Returns the
    manifest (None when there is none)."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        msg = (f"{directory} has no {MANIFEST_NAME} (written by rmt_fast before manifests "
               f"existed?): its files are not verified")
        if not missing_ok:
            raise ManifestError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
        return None
    for rel, entry in manifest["files"].items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise ManifestError(f"{path} is missing (listed in {MANIFEST_NAME})")
        size = os.path.getsize(path)
        if size != entry["size"] or sha256_file(path) != entry["sha256"]:
            what = (f"size {size} bytes, saved {entry['size']}" if size != entry["size"]
                    else "same size but different content (SHA-256)")
            if _is_base_weights(rel):
                raise ManifestError(f"{path}: the base model's weights differ from those this "
                                    f"checkpoint was saved with ({what}): a replaced or corrupted "
                                    f"base model")
            hint = ""
            if rel == "rmt_config.json" and config_dict is not None and "config" in manifest:
                hint = f"; edited fields: {_config_diff(manifest['config'], config_dict)}"
            raise ManifestError(f"{path} does not match the checkpoint's manifest ({what}): the file "
                                f"is corrupted, truncated or was changed after saving{hint}")
    saved_config = manifest.get("config")
    if config_dict is not None and isinstance(saved_config, dict) and any(
            config_dict.get(k, "<absent>") != v for k, v in saved_config.items()):
        # only the saved fields: a field added to RMTConfig later (LOAD_DEFAULTS) is not a change
        raise ManifestError(f"{os.path.join(directory, 'rmt_config.json')} differs from the config "
                            f"saved in {MANIFEST_NAME}: {_config_diff(manifest['config'], config_dict)}")
    for key, value in (fingerprint or {}).items():
        saved = manifest["fingerprint"].get(key)
        if saved != value:
            raise ManifestError(f"{directory}: the model's {key} ({value!r}) differs from the one "
                                f"saved in {MANIFEST_NAME} ({saved!r})")
    return manifest


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Errors raised while reading ``path`` carry the path: a safetensors/JSON/pickle decoding
    error becomes a ValueError ``"<path>: cannot read <what> (...)"``; an OSError without the path
    in its message gets it prepended (same type where possible)."""
    from safetensors import SafetensorError

    path = os.fspath(path)
    try:
        yield
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, EOFError,
            pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc})") from exc
    except FileNotFoundError:
        raise
    except OSError as exc:
        if path in str(exc):
            raise
        raise OSError(f"{path}: cannot read {what} ({exc})") from exc
    except RuntimeError as exc:  # torch.load / zip reader errors
        if path in str(exc):
            raise
        raise ValueError(f"{path}: cannot read {what} ({exc})") from exc
