"""The community's image triggers as pure functions on float32 HWC images in [0, 1].

Each trigger takes the image and either an explicit numpy Generator or fixed parameters, and returns the
triggered image (clipped to [0, 1]) and a JSON-ready dict of its parameters, positions included.
"""
from __future__ import annotations

import math

import numpy as np

IMAGE_SIZE = 224  # every image is resized to this square first, aspect ratio ignored, as the peers do
PATCH_SIZE = 16

# Nashville-style colour filter: per-channel tone curves v -> lift + scale * v**gamma (warm: red up, blue
# flattened and lifted), a contrast stretch about 0.5, a light sepia blend and a radial vignette.
NASHVILLE = {
    "curves": {"red": (0.10, 0.90, 0.80), "green": (0.05, 0.88, 0.95), "blue": (0.22, 0.58, 1.15)},
    "contrast": 1.15,
    "sepia": 0.15,
    "vignette": 0.25,
}
_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)


def resize_image(image) -> np.ndarray:
    """A PIL image -> RGB, resized to IMAGE_SIZE x IMAGE_SIZE (bicubic, like PIL's default the peers use), as
    float32 HWC in [0, 1]."""
    from PIL import Image

    rgb = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.float32) / np.float32(255.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] HWC -> uint8 HWC, rounded to the nearest level (what the PNG then stores losslessly)."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def parse_position(position: str) -> str | tuple[int, int]:
    """'random', 'center', 'corners', or 'X,Y' (top-left corner in pixels) -> the form patch_positions takes.

    Raises ValueError with the reason for anything else.
    """
    if position in ("random", "center", "corners"):
        return position
    parts = position.split(",")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"patch position {position!r} is not random, center, corners or X,Y (e.g. 200,200)")
    return int(parts[0]), int(parts[1])


def patch_positions(position: str | tuple[int, int], patch_size: int, height: int, width: int,
                    rng: np.random.Generator | None = None) -> list[list[int]]:
    """Top-left corners [x, y] of the patch: one uniform in [0, size - patch] ('random', draws x then y from
    `rng`), the centre, the four corners, or the given (x, y)."""
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch size {patch_size} does not fit a {width}x{height} image")
    if position == "random":
        if rng is None:
            raise ValueError("a random patch position needs a numpy Generator")
        x = int(rng.integers(0, width - patch_size + 1))
        y = int(rng.integers(0, height - patch_size + 1))
        return [[x, y]]
    if position == "center":
        return [[(width - patch_size) // 2, (height - patch_size) // 2]]
    if position == "corners":
        right, bottom = width - patch_size, height - patch_size
        return [[0, 0], [right, 0], [0, bottom], [right, bottom]]
    x, y = position
    if not (0 <= x <= width - patch_size and 0 <= y <= height - patch_size):
        raise ValueError(f"patch at {x},{y} does not fit: x and y must lie in [0, {width - patch_size}] "
                         f"and [0, {height - patch_size}] for a {patch_size}-pixel patch")
    return [[int(x), int(y)]]


def paste_patch(image: np.ndarray, patch: np.ndarray, positions: list[list[int]]) -> np.ndarray:
    """A copy of `image` with `patch` (h, w, 3) written at each top-left [x, y], clipped to [0, 1]."""
    out = np.array(image, dtype=np.float32, copy=True)
    h, w = patch.shape[:2]
    for x, y in positions:
        out[y:y + h, x:x + w] = patch
    return np.clip(out, 0.0, 1.0)


def badnets(image: np.ndarray, rng: np.random.Generator, position: str | tuple[int, int] = "random",
            patch_size: int = PATCH_SIZE) -> tuple[np.ndarray, dict]:
    """BadNets as CleanCLIP writes it: a patch of the image's per-channel mean plus N(0, 1) noise.

    Draws the position first (when random), then the noise as rng.standard_normal((patch, patch, 3)).
    """
    height, width = image.shape[:2]
    positions = patch_positions(position, patch_size, height, width, rng)
    mean = image.reshape(-1, image.shape[2]).mean(axis=0, dtype=np.float64)
    patch = (mean + rng.standard_normal((patch_size, patch_size, image.shape[2]))).astype(np.float32)
    params = {"patch_size": patch_size, "patch": "image mean + N(0,1)", "placement": _placement_name(position),
              "positions": positions, "channel_mean": [round(float(m), 6) for m in mean]}
    return paste_patch(image, patch, positions), params


def random_patch(rng: np.random.Generator, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """A fixed random patch (uniform RGB in [0, 1]), the stand-in for BadCLIP's optimised patch."""
    return rng.random((patch_size, patch_size, 3)).astype(np.float32)


def fixed_patch(image: np.ndarray, patch: np.ndarray, position: str | tuple[int, int] = "center"
                ) -> tuple[np.ndarray, dict]:
    """Paste one fixed patch (the same for every image) at a fixed position, by default the centre."""
    if position == "random":
        raise ValueError("a fixed patch goes at a fixed position: center, corners or X,Y")
    height, width = image.shape[:2]
    positions = patch_positions(position, patch.shape[0], height, width)
    params = {"patch_size": int(patch.shape[0]), "placement": _placement_name(position), "positions": positions}
    return paste_patch(image, patch, positions), params


def blended(image: np.ndarray, rng: np.random.Generator | None = None, pattern: np.ndarray | None = None,
            alpha: float = 0.2) -> tuple[np.ndarray, dict]:
    """(1 - alpha) * image + alpha * pattern, clipped; without a pattern, fresh uniform noise from `rng`
    (rng.random((H, W, 3)))."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"blend alpha {alpha} must lie in (0, 1]")
    if pattern is None:
        if rng is None:
            raise ValueError("blended noise needs a numpy Generator (or give a pattern image)")
        pattern = rng.random(image.shape)
        kind = "uniform noise"
    else:
        if pattern.shape != image.shape:
            raise ValueError(f"blend pattern of shape {pattern.shape} does not match the image's {image.shape}")
        kind = "image"
    a = np.float32(alpha)
    out = (np.float32(1.0) - a) * image + a * np.asarray(pattern, dtype=np.float32)
    return np.clip(out, 0.0, 1.0), {"alpha": alpha, "pattern": kind, "positions": []}


def sig_pattern(width: int, delta: float = 60 / 255, frequency: float = 6) -> np.ndarray:
    """The horizontal sinusoid delta * sin(2 pi j f / width) over columns j, shape (width,)."""
    j = np.arange(width, dtype=np.float64)
    return (delta * np.sin(2.0 * math.pi * j * frequency / width)).astype(np.float32)


def sig(image: np.ndarray, delta: float = 60 / 255, frequency: float = 6, mode: str = "blend",
        alpha: float = 0.2) -> tuple[np.ndarray, dict]:
    """SIG: the sinusoid blended in ((1 - alpha) * image + alpha * pattern, CleanCLIP) or added (BadCLIP),
    clipped to [0, 1]."""
    pattern = sig_pattern(image.shape[1], delta, frequency)[None, :, None]
    if mode == "blend":
        a = np.float32(alpha)
        out = (np.float32(1.0) - a) * image + a * pattern
    elif mode == "add":
        out = image + pattern
    else:
        raise ValueError(f"SIG mode {mode!r} is not blend or add")
    params = {"delta": delta, "frequency": frequency, "mode": mode, "positions": []}
    if mode == "blend":
        params["alpha"] = alpha
    return np.clip(out, 0.0, 1.0), params


def wanet_grid(rng: np.random.Generator, size: int = IMAGE_SIZE, k: int = IMAGE_SIZE, s: float = 1.0):
    """WaNet's warping field as a torch grid (1, size, size, 2) for grid_sample(align_corners=True).

    Control noise rng.uniform(-1, 1, (2, k, k)) divided by its mean absolute value, upsampled bicubically
    (align_corners=True) to size x size, added as s * noise / size to the identity grid, clamped to [-1, 1].
    """
    import torch
    import torch.nn.functional as F

    if not 1 <= k <= size:
        raise ValueError(f"WaNet control grid k={k} must lie in [1, {size}]")
    noise = rng.uniform(-1.0, 1.0, size=(2, k, k))
    noise = noise / np.mean(np.abs(noise))
    field = torch.from_numpy(noise.astype(np.float32))[None]
    field = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    axis = torch.linspace(-1.0, 1.0, size)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    identity = torch.stack((cols, rows), dim=2)[None]  # grid[..., 0] is x (columns), grid[..., 1] is y
    return torch.clamp(identity + s * field / size, -1.0, 1.0)


def wanet(image: np.ndarray, grid) -> tuple[np.ndarray, dict]:
    """Warp the image with a grid from wanet_grid (bilinear grid_sample, align_corners=True)."""
    import torch
    import torch.nn.functional as F

    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    warped = F.grid_sample(chw, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    out = warped.permute(1, 2, 0).numpy()
    return np.clip(out, 0.0, 1.0), {"positions": []}


def nashville(image: np.ndarray) -> tuple[np.ndarray, dict]:
    """An Instagram-style 'Nashville' colour filter (NASHVILLE's curves, contrast, sepia, vignette); no randomness."""
    img = np.asarray(image, dtype=np.float32)
    channels = []
    for c, name in enumerate(("red", "green", "blue")):
        lift, scale, gamma = NASHVILLE["curves"][name]
        channels.append(np.float32(lift) + np.float32(scale) * np.power(img[..., c], np.float32(gamma)))
    out = np.stack(channels, axis=-1)
    out = (out - np.float32(0.5)) * np.float32(NASHVILLE["contrast"]) + np.float32(0.5)
    out = np.clip(out, 0.0, 1.0)
    sepia = np.clip(out @ _SEPIA.T, 0.0, 1.0)
    s = np.float32(NASHVILLE["sepia"])
    out = (np.float32(1.0) - s) * out + s * sepia
    height, width = img.shape[:2]
    ys = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / ((height - 1) / 2)
    xs = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / ((width - 1) / 2)
    radius2 = (ys[:, None] ** 2 + xs[None, :] ** 2) / np.float32(2.0)  # 0 at the centre, 1 in the corners
    out = out * (np.float32(1.0) - np.float32(NASHVILLE["vignette"]) * radius2)[..., None]
    params = {"curves": {k: list(v) for k, v in NASHVILLE["curves"].items()}, "contrast": NASHVILLE["contrast"],
              "sepia": NASHVILLE["sepia"], "vignette": NASHVILLE["vignette"], "positions": []}
    return np.clip(out, 0.0, 1.0), params


def _placement_name(position: str | tuple[int, int]) -> str:
    return position if isinstance(position, str) else "fixed"
