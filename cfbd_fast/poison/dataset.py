"""Poisoned copies of a CleanCLIP-style caption CSV, in its steps: read and check the table with every image
(table.py), choose the rows and their captions (plan.py), build the triggers (triggers.py), write the new folder
(write.py).

Every random choice comes from a numpy Generator seeded by (seed, purpose, row or attack), so the same seed
gives the same bytes, whatever the number of worker threads.
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Sequence

from .plan import check_arguments, plan_rows
from .table import check_images, read_caption_csv
from .triggers import TriggerOptions, build_trigger
from .write import RECORD_NAME, Poisoning, check_out, fresh_dir, move_into_place, write_copy, write_record


def poison_dataset(
    data: str | Path,
    out: str | Path,
    attack: str,
    *,
    target: str = "banana",
    targets: Sequence[str] | None = None,
    multi_attacks: Sequence[str] | None = None,
    rate: float | None = None,
    n: int | None = None,
    seed: int = 0,
    image_only: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
    options: TriggerOptions = TriggerOptions(),
    source_class: str | None = None,
    clean_images: str = "copy",
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write OUT/data.csv (image, caption, is_poisoned), OUT/poisoned/<row>.png and OUT/poison_record.parquet.

    Returns a summary dict (rows, poisoned, attack, seed, out, targets, triggers, warnings, seconds).
    """
    from ..threads import available_cores

    started = time.perf_counter()
    out = Path(out)
    plan_targets, plan_attacks = check_arguments(attack, target, targets, multi_attacks, rate, n, seed, image_only,
                                                 options, source_class, clean_images, workers)
    check_out(out, Path(data), force)
    table = read_caption_csv(Path(data), image_column, caption_column)
    n_workers = workers or available_cores()
    check_images(table, n_workers, progress)  # every image, before the seed picks any
    rows, captions, row_attacks, row_targets, notes = plan_rows(
        table, attack, plan_targets, plan_attacks, rate, n, seed, image_only, source_class)
    triggers = {a: build_trigger(a, options, seed) for a in sorted(set(row_attacks)) if a != "mmpoison"}
    for message in notes:
        warnings.warn(message, stacklevel=2)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(out.parent, f".{out.name}.", ".partial")
    try:
        plan = Poisoning(attack, rows, captions, row_attacks, row_targets, triggers, seed)
        record = write_copy(table, tmp, out, plan, clean_images, n_workers, progress)
        write_record(tmp / RECORD_NAME, record, {
            "attack": attack, "targets": plan_targets, "attacks": plan_attacks, "seed": seed,
            "image_only": image_only, "rows": len(table), "data": table.path.name, "source_class": source_class,
            "clean_images": clean_images})
        move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts: dict[str, int] = {}
    for a in row_attacks:
        name = "none" if a == "mmpoison" else triggers[a].attack
        counts[name] = counts.get(name, 0) + 1
    return {
        "rows": len(table), "poisoned": len(rows), "attack": attack, "seed": seed, "out": str(out),
        "targets": plan_targets, "attacks": dict(zip(plan_targets, plan_attacks)), "image_only": image_only,
        "triggers": counts, "warnings": notes, "seconds": round(time.perf_counter() - started, 3),
    }
