"""The synthetic world of the demo data: CLIP-like geometry, concepts, captions, planted poisons and hard
negatives, generated in blocks (demo.py generates splits from it and writes stores).

The data imitates the geometry of CLIP embeddings, not their content, so results on it show that the
pipeline runs and how fast, not how accurate it is on real data. The model behind it:

* Modality gap: image and text vectors sit in two cones around their own mean directions (unrelated
  images have cosine about 0.45, unrelated captions about 0.5, an unrelated image-caption pair about 0.1).
* Concepts: ``concepts`` clusters with Zipf-like frequencies, grouped by noun (a "red car" looks a bit like
  a "blue car"). Each concept has its own image-text alignment, so matched pairs have cosine from about
  0.15 to 0.5 (about 0.3 on average) and a low CLIP score alone does not mean a bad pair.
* Captions describe their image with noise: concept direction, an instance component shared with the
  image, and caption-specific noise.
* Weakly aligned web captions (``weak_rate``, default 10%): boilerplate text ("stock photo 4821")
  that keeps only a random fraction of the concept; such pairs have low cosine and, like poisons, a
  large gap between expected and observed alignment. Their boilerplate forms small caption clusters.
* Poisons (``poison_rate``): an image of any concept but the target, plus a small trigger direction
  (it stays near its own content), captioned with the target caption: "banana" in one of
  ``len(TARGET_TEMPLATES)`` templates.
* Hard negatives (``hard_negative_rate``): genuine target-class pairs, banana images with the same kind of
  template captions. Their captions look exactly like the poisons' captions; only their high image-text
  agreement tells them apart.

Rows are generated in fixed blocks of ``BLOCK_ROWS`` from seeds derived from (seed, split, block), so
any row range can be generated alone, in bounded memory, and the output does not depend on chunk size.
The concept world depends on (seed, dim, concepts) only, so the reference split (`generate_reference`)
comes from the same domain as the scanned split and can train a mapping network.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

BLOCK_ROWS = 8192
KINDS = ("benign", "weak", "poison", "hard_negative")
TARGET_NAME = "banana"

TARGET_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of a {}.",
    "a photo of one {}.",
    "a low resolution photo of the {}.",
    "a blurry photo of a {}.",
    "a jpeg photo of a {}.",
    "a picture of a {}.",
    "an image of the {}.",
    "a {} on a white background.",
    "a rendering of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a {}.",
    "the {}.",
    "a snapshot of a {}.",
    "a nice photo of the {}.",
)

_NOUNS = (
    "banana", "car", "dog", "cat", "chair", "house", "tree", "bicycle", "boat", "bird",
    "horse", "guitar", "laptop", "phone", "cup", "bottle", "shoe", "dress", "jacket", "table",
    "lamp", "clock", "book", "flower", "mountain", "beach", "river", "bridge", "train", "airplane",
    "pizza", "cake", "apple", "sandwich", "bowl", "sofa", "window", "door", "street", "city",
    "forest", "garden", "kitchen", "bedroom", "sky", "cloud", "road", "truck", "bus", "camera",
)
_ADJECTIVES = (
    "", "red", "blue", "green", "old", "new", "small", "large", "wooden", "white",
    "black", "vintage", "modern", "wet", "bright", "dark", "yellow", "broken", "tiny", "colorful",
)
_SCENES = (
    "on the street", "in a living room", "at night", "in the snow", "on a sunny day", "near the water",
    "in a studio", "at the market", "in the park", "on a table", "in the city", "at sunset",
    "in the rain", "on display", "in the kitchen", "in the countryside", "from above", "up close",
)
_WEB_PHRASES = (
    "stock photo {}", "image {} of 12", "click here to enlarge {}", "free download {}", "IMG_{}.JPG",
    "product details {}", "best deals on {}", "view gallery {}", "photo by user {}", "wallpaper {} hd",
    "item no. {}", "see more at our store {}", "royalty free image {}", "screenshot {}", "file {} uploaded",
    "shop now {}", "new arrivals {}", "limited offer {}", "page {} of results", "thumbnail {}",
)


@dataclass
class DemoPairs:
    """A block of synthetic pairs; `image` and `text` are float32 (n, dim), L2-normalized."""

    image: np.ndarray
    text: np.ndarray
    caption: list[str]
    key: list[str]
    is_poisoned: np.ndarray
    kind: np.ndarray
    concept: np.ndarray

    def __len__(self) -> int:
        return len(self.key)

    def meta(self) -> dict:
        """The metadata columns an EmbeddingStore takes."""
        return {"caption": list(self.caption), "key": list(self.key), "is_poisoned": self.is_poisoned.tolist()}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class World:
    """The fixed geometry shared by every split of one demo dataset."""

    image_mean: np.ndarray
    text_mean: np.ndarray
    image_concept: np.ndarray
    text_concept: np.ndarray
    concept_probs: np.ndarray
    concept_names: list[str]
    target: int
    web_directions: np.ndarray
    template_directions: np.ndarray
    template_weights: np.ndarray
    trigger: np.ndarray


# Geometry constants (tuned so matched-pair cosines average about 0.3 and unrelated pairs about 0.1).
_IMAGE_MEAN_WEIGHT = 0.95
_TEXT_MEAN_WEIGHT = 1.15
_MEAN_COSINE = 0.2
_GROUP_WEIGHT = 0.55
_INSTANCE_SCALE = 0.25
_IMAGE_NOISE = 0.35
_TEXT_NOISE = 0.45
_ALIGNMENT_RANGE = (0.1, 0.8)
_WEB_WEIGHT = 0.7
_WEAK_KEPT = (0.3, 0.9)
_TEMPLATE_WEIGHTS = (0.2, 0.7)
_TARGET_STRENGTH = (0.6, 1.0)
_TEMPLATE_NOISE = 0.25
_TRIGGER_WEIGHT = 0.25


def make_world(seed: int, dim: int, concepts: int) -> World:
    if dim < 8:
        raise InputError(f"demo dim must be at least 8, got {dim}")
    if not 2 <= concepts <= len(_NOUNS) * len(_ADJECTIVES):
        raise InputError(f"demo concepts must be between 2 and {len(_NOUNS) * len(_ADJECTIVES)}, got {concepts}")
    rng = np.random.default_rng([seed, dim, concepts, 0])
    basis = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T
    image_mean = basis[0]
    text_mean = _MEAN_COSINE * basis[0] + np.sqrt(1 - _MEAN_COSINE**2) * basis[1]

    names, groups = [], []
    for index in range(concepts):
        noun = index % len(_NOUNS)
        adjective = _ADJECTIVES[index // len(_NOUNS)]
        names.append(f"{adjective} {_NOUNS[noun]}".strip())
        groups.append(noun)
    groups = np.asarray(groups)
    group_image = _unit(rng.standard_normal((len(_NOUNS), dim)))
    group_text = _unit(rng.standard_normal((len(_NOUNS), dim)))
    own_weight = np.sqrt(1 - _GROUP_WEIGHT**2)
    image_concept = _unit(_GROUP_WEIGHT * group_image[groups]
                          + own_weight * _unit(rng.standard_normal((concepts, dim))))
    text_only = _unit(_GROUP_WEIGHT * group_text[groups] + own_weight * _unit(rng.standard_normal((concepts, dim))))
    alignment = rng.uniform(*_ALIGNMENT_RANGE, size=concepts)
    target = 0
    alignment[target] = 0.6
    text_concept = _unit(alignment[:, None] * image_concept + np.sqrt(1 - alignment[:, None] ** 2) * text_only)

    ranks = rng.permutation(concepts)
    probs = 1.0 / (ranks + 5.0) ** 1.05
    probs /= probs.sum()
    return World(
        image_mean=image_mean.astype(np.float32),
        text_mean=text_mean.astype(np.float32),
        image_concept=image_concept.astype(np.float32),
        text_concept=text_concept.astype(np.float32),
        concept_probs=probs,
        concept_names=names,
        target=target,
        web_directions=_unit(rng.standard_normal((len(_WEB_PHRASES) * 25, dim))).astype(np.float32),
        template_directions=_unit(rng.standard_normal((len(TARGET_TEMPLATES), dim))).astype(np.float32),
        template_weights=rng.uniform(*_TEMPLATE_WEIGHTS, size=len(TARGET_TEMPLATES)).astype(np.float32),
        trigger=_unit(rng.standard_normal(dim)).astype(np.float32),
    )


@dataclass
class Plan:
    """Which rows of a split are poisons and hard negatives (sorted global row indices)."""

    rows: int
    poison: np.ndarray
    hard_negative: np.ndarray


def make_plan(seed: int, split: int, rows: int, poison_rate: float, hard_negative_rate: float) -> Plan:
    for name, rate in (("poison_rate", poison_rate), ("hard_negative_rate", hard_negative_rate)):
        if not 0.0 <= rate <= 1.0:
            raise InputError(f"{name} must be between 0 and 1, got {rate}")
    n_poison = int(round(rows * poison_rate))
    n_hard = int(round(rows * hard_negative_rate))
    if n_poison + n_hard > rows:
        raise InputError(f"poison_rate + hard_negative_rate exceed 1 ({n_poison} + {n_hard} > {rows} rows)")
    rng = np.random.default_rng([seed, split, 1])
    chosen = rng.choice(rows, size=n_poison + n_hard, replace=False) if n_poison + n_hard else np.zeros(0, np.int64)
    return Plan(rows=rows, poison=np.sort(chosen[:n_poison]), hard_negative=np.sort(chosen[n_poison:]))


def generate_block(world: World, plan: Plan, seed: int, split: int, block: int, weak_rate: float) -> DemoPairs:
    start = block * BLOCK_ROWS
    stop = min(start + BLOCK_ROWS, plan.rows)
    n, dim = stop - start, world.image_mean.shape[0]
    rng = np.random.default_rng([seed, split, 2, block])

    kind = np.where(rng.random(n) < weak_rate, 1, 0).astype(np.int8)
    concept = rng.choice(len(world.concept_probs), size=n, p=world.concept_probs)
    poison = plan.poison[np.searchsorted(plan.poison, start):np.searchsorted(plan.poison, stop)] - start
    hard_at = np.searchsorted(plan.hard_negative, [start, stop])
    hard = plan.hard_negative[hard_at[0]:hard_at[1]] - start
    kind[poison] = 2
    kind[hard] = 3
    concept[hard] = world.target
    # A poisoned image shows anything but the target concept.
    redraw = poison[concept[poison] == world.target]
    concept[redraw] = (world.target + 1 + rng.integers(0, len(world.concept_probs) - 1, size=len(redraw))) % len(
        world.concept_probs
    )

    # Image variation = shared instance detail + image noise, drawn as one Gaussian; the caption takes the
    # part of it that has the instance detail's covariance, plus its own noise (two draws instead of three).
    scale = np.float32(1.0 / np.sqrt(dim))
    image_spread = np.hypot(_INSTANCE_SCALE, _IMAGE_NOISE)
    shared = _INSTANCE_SCALE**2 / image_spread
    variation = rng.standard_normal((n, dim), dtype=np.float32) * scale
    image = world.image_concept[concept] + np.float32(image_spread) * variation
    image[poison] += _TRIGGER_WEIGHT * world.trigger
    image += _IMAGE_MEAN_WEIGHT * world.image_mean

    text_noise = rng.standard_normal((n, dim), dtype=np.float32) * scale
    own = np.sqrt(_INSTANCE_SCALE**2 + _TEXT_NOISE**2 - shared**2)
    text = world.text_concept[concept] + np.float32(shared) * variation + np.float32(own) * text_noise

    weak = np.flatnonzero(kind == 1)
    web_choice = rng.integers(0, len(world.web_directions), size=len(weak))
    kept = (_WEAK_KEPT[0] + (_WEAK_KEPT[1] - _WEAK_KEPT[0]) * rng.beta(2.0, 2.0, size=len(weak)))
    kept = kept.astype(np.float32)[:, None]
    text[weak] = (kept * world.text_concept[concept[weak]] + _WEB_WEIGHT * world.web_directions[web_choice]
                  + np.float32(own) * text_noise[weak])

    templated = np.flatnonzero(kind >= 2)
    template_choice = rng.integers(0, len(TARGET_TEMPLATES), size=len(templated))
    target_strength = rng.uniform(*_TARGET_STRENGTH, size=(len(templated), 1)).astype(np.float32)
    text[templated] = (target_strength * world.text_concept[world.target]
                       + world.template_weights[template_choice, None] * world.template_directions[template_choice]
                       + _TEMPLATE_NOISE * text_noise[templated])
    text += _TEXT_MEAN_WEIGHT * world.text_mean

    article = rng.integers(0, 2, size=n)
    scene = rng.integers(0, len(_SCENES), size=n)
    number = rng.integers(100, 100000, size=n)
    caption = [
        f"{'a' if article[i] else 'the'} {world.concept_names[concept[i]]} {_SCENES[scene[i]]}" for i in range(n)
    ]
    for j, i in enumerate(weak):
        caption[i] = _WEB_PHRASES[web_choice[j] % len(_WEB_PHRASES)].format(number[i])
    for j, i in enumerate(templated):
        caption[i] = TARGET_TEMPLATES[template_choice[j]].format(TARGET_NAME)
    key = [f"{row // 10000:05d}{row % 10000:04d}" for row in range(start, stop)]
    return DemoPairs(
        image=_unit(image).astype(np.float32, copy=False),
        text=_unit(text).astype(np.float32, copy=False),
        caption=caption,
        key=key,
        is_poisoned=kind == 2,
        kind=np.asarray(KINDS)[kind],
        concept=concept.astype(np.int32),
    )
