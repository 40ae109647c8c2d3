"""What a poisoned copy changes, decided before anything is written: the arguments checked, the rows chosen,
their attacks, targets and new captions. Every random choice comes from a numpy Generator seeded by (seed,
purpose, row or attack), so the same seed gives the same rows and captions."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from . import attacks
from .table import CaptionTable, mentions
from .templates import IMAGENET_TEMPLATES, one_caption

ATTACKS = ("badnets", "blended", "sig", "wanet", "nashville", "label-consistent", "badclip-style", "mmpoison",
           "multi-trigger", "one-caption")
# Attacks a multi-trigger run may mix, in the order it assigns them to targets when --attacks is not given.
MULTI_TRIGGER_ATTACKS = ("badnets", "blended", "sig", "wanet", "nashville", "badclip-style")
CLEAN_IMAGE_MODES = ("copy", "hardlink", "reference")
# Purposes of the derived seeds, and stable codes of the attacks' shared (per-attack) randomness.
SELECT, CAPTION, TRIGGER, SHARED = 1, 2, 3, 4
ATTACK_CODES = {"badnets": 1, "blended": 2, "sig": 3, "wanet": 4, "nashville": 5, "badclip-style": 6}

# Which attacks use each trigger option (TriggerOptions' fields).
OPTION_USERS = {
    "position": ("badnets", "label-consistent", "badclip-style", "one-caption"),
    "patch_size": ("badnets", "label-consistent", "badclip-style", "one-caption"),
    "alpha": ("blended", "sig"),
    "pattern": ("blended",),
    "sig_mode": ("sig",),
    "wanet_k": ("wanet",),
    "wanet_s": ("wanet",),
}


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one purpose (and row or attack), from the user's seed."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


def template_captions(target: str, rows: Iterable[int], seed: int) -> list[str]:
    """One of the 80 ImageNet templates per row, drawn with the row's caption Generator."""
    return [IMAGENET_TEMPLATES[int(np.random.default_rng(derive_seed(seed, CAPTION, r)).integers(
        len(IMAGENET_TEMPLATES)))].format(target) for r in rows]


def natural_caption(pool: Sequence[str], own: str, row: int, seed: int) -> str:
    """One caption of `pool` (real captions that mention the target) other than the row's own, drawn with the
    row's caption Generator."""
    choices = [c for c in pool if c != own] or pool
    return choices[int(np.random.default_rng(derive_seed(seed, CAPTION, row)).integers(len(choices)))]


def check_arguments(attack, target, targets, multi_attacks, rate, n, seed, image_only, options, source_class,
                    clean_images, workers) -> tuple[list[str], list[str]]:
    if attack not in ATTACKS:
        raise InputError(f"unknown attack {attack!r} for --attack: choose one of {', '.join(ATTACKS)}")
    if rate is not None and n is not None:
        raise InputError("give --rate or --n, not both")
    if rate is None and n is None and not image_only:
        raise InputError("say how many rows to poison: --rate FRACTION (e.g. 0.01) or --n COUNT")
    if rate is not None and not 0.0 < rate <= 1.0:
        raise InputError(f"--rate {rate} must lie in (0, 1]: it is the fraction of DATA's rows to poison")
    if n is not None and n < 1:
        raise InputError(f"--n {n} must be at least 1")
    if seed < 0:
        raise InputError(f"--seed {seed} must be a non-negative integer")
    if clean_images not in CLEAN_IMAGE_MODES:
        raise InputError(f"--clean-images {clean_images!r}: choose one of {', '.join(CLEAN_IMAGE_MODES)}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers} must be at least 1")
    if attack == "multi-trigger":
        if image_only:
            raise InputError("--image-only renders one trigger at a time: run it once per attack with the same "
                             "--seed (multi-trigger uses the single attacks' triggers for that seed)")
        names = [t.strip() for t in (targets or [])]
        if len(names) < 2:
            raise InputError("--attack multi-trigger needs --targets with two or more targets, e.g. banana,airplane")
        if multi_attacks:
            chosen = [a.strip() for a in multi_attacks]
            for a in chosen:
                if a not in MULTI_TRIGGER_ATTACKS:
                    raise InputError(f"--attacks: {a!r} cannot be mixed; choose from "
                                     f"{', '.join(MULTI_TRIGGER_ATTACKS)}")
            if len(chosen) != len(names):
                raise InputError(f"--attacks names {len(chosen)} attacks for {len(names)} targets: give one per target")
            if len(set(chosen)) != len(chosen):
                raise InputError("--attacks repeats an attack: give each target a different trigger")
        else:
            if len(names) > len(MULTI_TRIGGER_ATTACKS):
                raise InputError(f"--targets names {len(names)} targets, more than the {len(MULTI_TRIGGER_ATTACKS)} "
                                 "distinct triggers: use fewer targets")
            chosen = list(MULTI_TRIGGER_ATTACKS[:len(names)])
    else:
        if targets:
            raise InputError("--targets is for --attack multi-trigger; give a single --target")
        if multi_attacks:
            raise InputError("--attacks is for --attack multi-trigger; give a single --attack")
        names, chosen = [target.strip()], [attack]
    for name in names:
        if not name or "\n" in name:
            raise InputError(f"target {name!r} must be a non-empty word or phrase, e.g. banana")
    if len(set(n_.lower() for n_ in names)) != len(names):
        raise InputError("--targets repeats a target: give each once")
    if attack == "mmpoison":
        if image_only:
            raise InputError("mmpoison has no image trigger: --image-only does not apply to it")
        if not source_class or not source_class.strip():
            raise InputError("--attack mmpoison needs --source-class WORD: the class whose images get target captions")
        if source_class.strip().lower() == names[0].lower():
            raise InputError(f"--source-class {source_class!r} is the target itself: choose another class")
    elif source_class is not None:
        raise InputError("--source-class applies to --attack mmpoison only")
    for option, users in OPTION_USERS.items():
        if getattr(options, option) is not None and not set(users) & set(chosen):
            flag = "--" + option.replace("_", "-")
            raise InputError(f"{flag} applies to {', '.join(users)}, not to {', '.join(chosen)}")
    _check_trigger_options(options)
    return names, chosen


def _check_trigger_options(options) -> None:  # a triggers.TriggerOptions
    size = attacks.IMAGE_SIZE
    if options.patch_size is not None and not 1 <= options.patch_size <= size:
        raise InputError(f"--patch-size {options.patch_size} must lie in [1, {size}]")
    if options.position is not None:
        try:
            position = attacks.parse_position(options.position)
            if position != "random":
                attacks.patch_positions(position, options.patch_size or attacks.PATCH_SIZE, size, size)
        except ValueError as exc:
            raise InputError(f"--position: {exc}") from exc
    if options.alpha is not None and not 0.0 < options.alpha <= 1.0:
        raise InputError(f"--alpha {options.alpha} must lie in (0, 1]")
    if options.sig_mode is not None and options.sig_mode not in ("blend", "add"):
        raise InputError(f"--sig-mode {options.sig_mode!r}: choose blend or add")
    if options.wanet_k is not None and not 1 <= options.wanet_k <= size:
        raise InputError(f"--wanet-k {options.wanet_k} must lie in [1, {size}]")
    if options.wanet_s is not None and not options.wanet_s > 0:
        raise InputError(f"--wanet-s {options.wanet_s} must be positive")
    if options.pattern is not None and not Path(options.pattern).is_file():
        raise InputError(f"--pattern {options.pattern} not found: give an image file to blend in")


def _count(rate: float | None, n: int | None, available: int, rows: int, what: str, table: CaptionTable) -> int:
    if n is None and rate is None:
        return available
    k = n if n is not None else int(round(rate * rows))
    if rate is not None and k == 0:
        raise InputError(f"--rate {rate} of {rows} rows in {table.path} poisons no row: raise --rate or use --n")
    if k > available:
        given = f"--n {n}" if n is not None else f"--rate {rate} ({k} rows)"
        raise InputError(f"{given} asks for more rows than the {available} {what} of {table.path}: lower it")
    return k


def plan_rows(table: CaptionTable, attack: str, targets: list[str], chosen: list[str], rate, n, seed: int,
              image_only: bool, source_class: str | None):
    """Rows to poison (sorted), their new captions, trigger attacks and targets, and warnings to show."""
    rows = len(table)
    notes: list[str] = []
    select = np.random.default_rng(derive_seed(seed, SELECT))
    if attack == "label-consistent" and not image_only:
        candidates = np.flatnonzero(mentions(table.captions, targets[0]))
        if candidates.size == 0:
            raise InputError(f"no caption in {table.path} mentions {targets[0]!r}: label-consistent poisons only rows "
                             "whose caption already names the target; choose another --target")
        what = f"rows whose caption mentions {targets[0]!r}"
    elif attack == "mmpoison":
        source = mentions(table.captions, source_class)
        candidates = np.flatnonzero(source & ~mentions(table.captions, targets[0]))
        if candidates.size == 0:
            raise InputError(f"no caption in {table.path} mentions {source_class!r} (--source-class) without "
                             f"{targets[0]!r}: choose a class the captions name")
        what = f"rows whose caption mentions {source_class!r}"
    else:
        candidates = np.arange(rows)
        what = "rows"
    k = _count(rate, n, int(candidates.size), rows, what, table)
    if k < len(targets):
        raise InputError(f"{k} poisoned rows cannot cover {len(targets)} targets: raise --n or --rate to at least "
                         f"one row per target")
    picked = select.choice(candidates, size=k, replace=False) if k < candidates.size else select.permutation(candidates)
    # Split among the targets (multi-trigger): sizes as even as possible, the first targets take the remainder.
    sizes = [k // len(targets) + (1 if i < k % len(targets) else 0) for i in range(len(targets))]
    poison_rows: list[int] = []
    row_attacks: list[str] = []
    row_targets: list[str] = []
    start = 0
    for tgt, att, size in zip(targets, chosen, sizes):
        group = sorted(int(r) for r in picked[start:start + size])
        start += size
        poison_rows += group
        row_attacks += [att] * len(group)
        row_targets += [tgt] * len(group)
    order = np.argsort(poison_rows, kind="stable")
    poison_rows = [poison_rows[i] for i in order]
    row_attacks = [row_attacks[i] for i in order]
    row_targets = [row_targets[i] for i in order]
    new_captions = _new_captions(table, poison_rows, row_attacks, row_targets, seed, image_only, notes)
    return poison_rows, new_captions, row_attacks, row_targets, notes


def _new_captions(table: CaptionTable, poison_rows: list[int], row_attacks: list[str], row_targets: list[str],
                  seed: int, image_only: bool, notes: list[str]) -> list[str]:
    """Each poisoned row's caption: its own (image-only, label-consistent), a real caption naming the target
    (badclip-style, mmpoison; templates when none does, noted), the one caption, or an ImageNet template."""
    new_captions: list[str] = []
    pools: dict[str, list[str]] = {}
    for row, att, tgt in zip(poison_rows, row_attacks, row_targets):
        if image_only or att == "label-consistent":
            new_captions.append(table.captions[row])
        elif att in ("badclip-style", "mmpoison"):
            if tgt not in pools:
                pools[tgt] = [table.captions[i] for i in np.flatnonzero(mentions(table.captions, tgt))]
                if not pools[tgt]:
                    notes.append(f"no caption in {table.path} mentions {tgt!r}: {att} falls back to the ImageNet "
                                 "templates for its target captions")
            pool = pools[tgt]
            if pool:
                new_captions.append(natural_caption(pool, table.captions[row], row, seed))
            else:
                new_captions += template_captions(tgt, [row], seed)
        elif att == "one-caption":
            new_captions.append(one_caption(tgt))
        else:
            new_captions += template_captions(tgt, [row], seed)
    return new_captions
