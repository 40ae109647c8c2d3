"""open_clip models for `cfbd-fast embed`: loading, the tiny test model `cfbd-tiny`, and a model identity record.

open_clip is imported here only, inside functions, so that `cfbd-fast` starts fast for every other command.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

TINY_MODEL = "cfbd-tiny"
# A ViT small enough that every embed test runs on a CPU in seconds, through the same code path as ViT-B-32.
TINY_MODEL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
RANDOM_WEIGHTS = "none"  # --pretrained value (and store record) for seeded random weights
RANDOM_SEED = 0
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
# what open_clip looks for in a hub repository: the config, then safetensors weights before pickled ones
HF_CONFIG, HF_WEIGHTS = "open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".npy")


@dataclass
class LoadedModel:
    """An open_clip model ready for inference, with its preprocessing, tokenizer and identity."""

    model: Any
    preprocess: Callable  # PIL image -> normalised CHW float tensor (open_clip's inference transform)
    tokenizer: Callable  # list[str] -> LongTensor (rows, context)
    preprocess_cfg: dict  # size, mean, std, interpolation, resize_mode of `preprocess`
    identity: dict
    device: str


def register_tiny_model() -> None:
    """Make `cfbd-tiny` known to open_clip (once per process), through its public add_model_config."""
    import open_clip

    if TINY_MODEL in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / f"{TINY_MODEL}.json"
        config.write_text(json.dumps(TINY_MODEL_CONFIG))
        open_clip.add_model_config(config)  # read now; the registry keeps the entry after the file is gone


def is_random(pretrained: str | None) -> bool:
    return pretrained is None or pretrained.strip().lower() == RANDOM_WEIGHTS


def model_identity(name: str, pretrained: str | None) -> dict:
    """What the vectors depend on, computed without loading weights: name, weights and embedding dim.

    Local files are identified by a digest of their contents, so a moved checkpoint still matches.
    """
    import open_clip

    if name == TINY_MODEL:
        register_tiny_model()
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise InputError(f"{folder}: no open_clip_config.json; a local-dir: model is a folder with "
                             "open_clip_config.json and its weights (e.g. open_clip_model.safetensors)")
        if not is_random(pretrained):
            raise InputError(f"--pretrained {pretrained} cannot be used with {name}: the folder holds the weights")
        try:
            config = json.loads(config_path.read_text())
            dim = int(config["model_cfg"]["embed_dim"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{config_path}: not an open_clip config with model_cfg.embed_dim ({exc})") from None
        return {"name": name, "pretrained": None, "architecture": _bytes_digest(config_path.read_bytes()),
                "weights": _local_dir_weights(folder), "dim": dim}
    if name.startswith(HF_HUB):
        return _hf_hub_identity(name, pretrained)
    config = open_clip.get_model_config(name)
    if config is None:
        raise InputError(f"unknown model {name!r}: use an open_clip name (e.g. ViT-B-32; open_clip.list_models() "
                         f"lists them), {TINY_MODEL}, or local-dir:PATH")
    dim = int(config["embed_dim"])
    if is_random(pretrained):
        return {"name": name, "pretrained": RANDOM_WEIGHTS, "architecture": name,
                "weights": f"random (seed {RANDOM_SEED})", "dim": dim}
    if open_clip.get_pretrained_cfg(name, pretrained):
        return {"name": name, "pretrained": pretrained, "architecture": name, "weights": pretrained, "dim": dim}
    path = Path(pretrained)
    if path.is_file():
        return {"name": name, "pretrained": pretrained, "architecture": name, "weights": _file_digest(path),
                "dim": dim}
    tags = open_clip.list_pretrained_tags_by_model(name)
    looks_like_path = os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
    what = "no such checkpoint file" if looks_like_path else "not a pretrained tag of this model"
    raise InputError(f"--pretrained {pretrained}: {what} for {name}; use one of its tags "
                     f"({', '.join(tags) or 'none known'}), a local .pt/.safetensors checkpoint, or none")


def same_model(a: dict, b: dict) -> bool:
    """Whether two identities describe the same vectors (names of moved local files may differ)."""
    return all(a.get(k) == b.get(k) for k in ("architecture", "weights", "dim"))


def describe(identity: dict) -> str:
    """A short human name: `ViT-B-32 (openai), dim 512`."""
    pretrained = identity.get("pretrained")
    return f"{identity.get('name')}{f' ({pretrained})' if pretrained else ''}, dim {identity.get('dim')}"


def load_model(name: str, pretrained: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load an open_clip model with create_model_and_transforms and its tokenizer with get_tokenizer.

    `pretrained`: an open_clip tag (downloaded by open_clip), a local checkpoint, or None/"none" for random
    weights seeded with RANDOM_SEED (the same weights in every process). Not used with `local-dir:` names.
    """
    import open_clip
    import torch

    identity = model_identity(name, pretrained)
    random_weights = name.startswith((LOCAL_DIR, HF_HUB)) or is_random(pretrained)
    try:
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if random_weights else pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(name)
    except InputError:
        raise
    except Exception as exc:  # torch.load, safetensors, zipfile and open_clip each raise their own types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = message if len(message) <= 160 else message[:157] + "..."
        if not random_weights and "download" in message.lower():
            raise InputError(f"cannot download the {pretrained} weights of {name} (no network?): run once with "
                             "network access (open_clip caches them) or pass a local checkpoint with --pretrained "
                             "PATH") from None
        source = name if name.startswith(LOCAL_DIR) else f"{name} with --pretrained {pretrained}"
        raise InputError(f"cannot load {source}: {message}; check that the weights belong to this model") from None
    model.eval()
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, preprocess_cfg=preprocess_cfg,
                       identity=identity, device=device)


def _hf_hub_identity(name: str, pretrained: str | None) -> dict:
    """Config and weights of an `hf-hub:ORG/NAME` model, fetched (or found in the Hugging Face cache, as with
    HF_HUB_OFFLINE=1) before open_clip loads it: open_clip itself would fall back to random weights silently."""
    from huggingface_hub import hf_hub_download

    repo = name[len(HF_HUB):]
    if not is_random(pretrained):
        raise InputError(f"--pretrained {pretrained} cannot be used with {name}: the hub repository holds the weights")

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception:  # not found, offline and not cached, or a network error: huggingface_hub has many types
            return None

    config_path = fetch(HF_CONFIG)
    weights = next((p for p in map(fetch, HF_WEIGHTS) if p is not None), None) if config_path else None
    if config_path is None or weights is None:
        what = HF_CONFIG if config_path is None else f"{' or '.join(HF_WEIGHTS)}"
        raise InputError(f"{name}: cannot fetch {what} (no network, or not in the Hugging Face cache with "
                         "HF_HUB_OFFLINE=1?): run once with network access, or point HF_HOME at a cache that holds "
                         "the repository")
    try:
        dim = int(json.loads(config_path.read_text())["model_cfg"]["embed_dim"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{config_path}: not an open_clip config with model_cfg.embed_dim ({exc})") from None
    return {"name": name, "pretrained": None, "architecture": _bytes_digest(config_path.read_bytes()),
            "weights": _file_digest(weights), "dim": dim}


def _local_dir_weights(folder: Path) -> str:
    """Digest of every checkpoint file in a local-dir folder (open_clip loads one of them)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)
    if not files:
        return RANDOM_WEIGHTS
    return "files:" + hashlib.sha256(" ".join(f"{p.name}={_file_digest(p)}" for p in files).encode()).hexdigest()[:32]


def _bytes_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


def _file_digest(path: Path, edge: int = 4 << 20) -> str:
    """Size plus sha256 of the first and last 4 MiB: cheap for multi-GB checkpoints, distinct for retrained ones."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(edge))
        if size > edge:
            fh.seek(max(edge, size - edge))
            digest.update(fh.read(edge))
    return f"file:{size}:{digest.hexdigest()[:32]}"


@contextmanager
def _quiet_open_clip():
    """open_clip logs routine notes (e.g. random initialisation) through the root logger, whose first use also
    installs a stderr handler that repeats huggingface_hub's own messages; we report our own errors."""
    root = logging.getLogger()
    level = root.level
    guard = logging.NullHandler() if not root.handlers else None  # keeps logging.warning() from configuring
    if guard is not None:
        root.addHandler(guard)
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)
        if guard is not None:
            root.removeHandler(guard)
