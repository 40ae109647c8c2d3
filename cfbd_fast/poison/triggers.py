"""The image triggers of the attacks, built once per poisoned copy with their per-attack randomness drawn from
the seed (WaNet's grid, the BadCLIP-style patch)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from . import attacks
from .plan import ATTACK_CODES, SHARED, derive_seed


@dataclass(frozen=True)
class TriggerOptions:
    """Trigger settings; None means the attack's default. Options an attack does not use must stay None."""

    position: str | None = None  # random | center | corners | X,Y (badnets, label-consistent, badclip-style)
    patch_size: int | None = None  # 16 (badnets, label-consistent, badclip-style)
    alpha: float | None = None  # 0.2 (blended; sig in blend mode)
    pattern: Path | None = None  # blended: an image instead of fresh uniform noise
    sig_mode: str | None = None  # blend (CleanCLIP) | add (BadCLIP)
    wanet_k: int | None = None  # 224: control grid size
    wanet_s: float | None = None  # 1.0: warping strength


@dataclass
class Trigger:
    """One trigger, ready to apply: `apply(image, rng)` -> (image, params); `shared` are its per-attack params."""

    attack: str
    apply: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict]]
    uses_rng: bool
    shared: dict = field(default_factory=dict)


def build_trigger(attack: str, options: TriggerOptions, seed: int) -> Trigger:
    """The trigger of `attack` with its per-attack randomness (WaNet grid, BadCLIP-style patch) drawn from seed."""
    if attack in ("badnets", "label-consistent", "one-caption"):  # one-caption: badnets' patch, one caption
        position = attacks.parse_position(options.position or "random")
        size = options.patch_size or attacks.PATCH_SIZE
        return Trigger("badnets", lambda img, rng: attacks.badnets(img, rng, position, size), uses_rng=True)
    if attack == "blended":
        alpha = 0.2 if options.alpha is None else options.alpha
        if options.pattern is None:
            return Trigger("blended", lambda img, rng: attacks.blended(img, rng, alpha=alpha), uses_rng=True)
        pattern, digest = _load_pattern(Path(options.pattern))
        shared = {"pattern_file": Path(options.pattern).name, "pattern_sha256": digest}
        return Trigger("blended", lambda img, rng: attacks.blended(img, pattern=pattern, alpha=alpha),
                        uses_rng=False, shared=shared)
    if attack == "sig":
        alpha = 0.2 if options.alpha is None else options.alpha
        mode = options.sig_mode or "blend"
        return Trigger("sig", lambda img, rng: attacks.sig(img, mode=mode, alpha=alpha), uses_rng=False)
    if attack == "wanet":
        k = options.wanet_k or attacks.IMAGE_SIZE
        s = 1.0 if options.wanet_s is None else options.wanet_s
        grid_seed = derive_seed(seed, SHARED, ATTACK_CODES["wanet"])
        grid = attacks.wanet_grid(np.random.default_rng(grid_seed), attacks.IMAGE_SIZE, k, s)
        shared = {"grid_seed": grid_seed, "k": k, "s": s, "size": attacks.IMAGE_SIZE}
        return Trigger("wanet", lambda img, rng: attacks.wanet(img, grid), uses_rng=False, shared=shared)
    if attack == "nashville":
        return Trigger("nashville", lambda img, rng: attacks.nashville(img), uses_rng=False)
    if attack == "badclip-style":
        size = options.patch_size or attacks.PATCH_SIZE
        position = attacks.parse_position(options.position or "center")
        patch_seed = derive_seed(seed, SHARED, ATTACK_CODES["badclip-style"])
        patch = attacks.random_patch(np.random.default_rng(patch_seed), size)
        return Trigger("badclip-style", lambda img, rng: attacks.fixed_patch(img, patch, position),
                        uses_rng=False, shared={"patch_seed": patch_seed, "patch": "uniform RGB"})
    raise InputError(f"attack {attack!r} has no image trigger")


def _load_pattern(path: Path) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(path) as im:
            pattern = attacks.resize_image(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"--pattern {path} cannot be read as an image: {exc}") from exc
    return pattern, hashlib.sha256(data).hexdigest()
