"""`cfbd-fast poison`: write a seeded, poisoned copy of a caption CSV dataset with the community's backdoor attacks."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import Json, Quiet

_ATTACK_HELP = ("badnets, blended, sig, wanet, nashville, label-consistent, badclip-style, mmpoison, "
                "multi-trigger or one-caption (badnets' patch, every poison captioned 'a photo of a TARGET.').")


def poison(
    data: Annotated[Path, typer.Argument(help="Caption CSV (columns image,caption; image paths relative to its "
                                              "folder), or a folder holding a data.csv.")],
    attack: Annotated[str, typer.Option(help=f"Attack: {_ATTACK_HELP}")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New dataset folder to write (data.csv, poisoned/, "
                                                          "images/, poison_record.parquet).")],
    target: Annotated[str, typer.Option(help="Target label the poisoned captions name.")] = "banana",
    rate: Annotated[Optional[float], typer.Option(help="Fraction of DATA's rows to poison, in (0, 1].")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Number of rows to poison (instead of --rate).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice: the same seed writes the same bytes.")]
    = 0,
    image_only: Annotated[bool, typer.Option(help="Trigger images but keep every caption (a test split for "
                                                  "attack success); all rows unless --rate/--n.")] = False,
    targets: Annotated[Optional[str], typer.Option(help="multi-trigger: comma-separated targets, one trigger "
                                                        "each, e.g. banana,airplane.")] = None,
    attacks: Annotated[Optional[str], typer.Option(
        help="multi-trigger: comma-separated attack per target.", show_default="badnets,blended,sig,...")] = None,
    source_class: Annotated[Optional[str], typer.Option(help="mmpoison: rows whose caption names this class get "
                                                             "captions of the target.")] = None,
    position: Annotated[Optional[str], typer.Option(
        help="Patch position: random, center, corners or X,Y.", show_default="random; center for badclip-style")
    ] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="Patch side in pixels.", show_default="16")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Blend weight of the pattern (blended, sig).",
                                                   show_default="0.2")] = None,
    pattern: Annotated[Optional[Path], typer.Option(help="blended: an image to blend in instead of fresh "
                                                         "uniform noise.")] = None,
    sig_mode: Annotated[Optional[str], typer.Option(help="sig: blend (CleanCLIP) or add (BadCLIP).",
                                                    show_default="blend")] = None,
    wanet_k: Annotated[Optional[int], typer.Option(help="wanet: control grid size.", show_default="224")] = None,
    wanet_s: Annotated[Optional[float], typer.Option(help="wanet: warping strength.", show_default="1")] = None,
    image_column: Annotated[str, typer.Option(help="DATA's column of image paths.")] = "image",
    caption_column: Annotated[str, typer.Option(help="DATA's column of captions.")] = "caption",
    clean_images: Annotated[str, typer.Option(help="Clean images: copy (self-contained OUT), hardlink (no extra "
                                                   "space; edits reach the originals) or reference (paths back "
                                                   "to DATA's files).")] = "copy",
    workers: Annotated[Optional[int], typer.Option(help="Threads reading and writing images.",
                                                   show_default="the cores available")] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Write a poisoned copy of a caption dataset: triggered images as PNG, new captions, and a parquet record."""
    from ..poison import TriggerOptions, poison_dataset

    def split(value: Optional[str]) -> Optional[list[str]]:
        return None if value is None else [v.strip() for v in value.split(",") if v.strip()]

    options = TriggerOptions(position=position, patch_size=patch_size, alpha=alpha, pattern=pattern,
                             sig_mode=sig_mode, wanet_k=wanet_k, wanet_s=wanet_s)
    if attack.strip() in ("wanet", "multi-trigger"):
        from ..threads import configure_threads

        configure_threads(1)  # one image per worker thread; torch's own threads would only compete
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = poison_dataset(
            data, out, attack.strip(), target=target, targets=split(targets), multi_attacks=split(attacks),
            rate=rate, n=n, seed=seed, image_only=image_only, image_column=image_column,
            caption_column=caption_column, options=options, source_class=source_class, clean_images=clean_images,
            force=force, workers=workers, progress=not quiet)
    for warning in caught:
        typer.echo(f"Warning: {warning.message}", err=True)
    if json_out:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    what = "triggered" if image_only else "poisoned"
    aims = ", ".join(f"{a} -> {t}" for t, a in summary["attacks"].items())
    typer.echo(f"{what} {summary['poisoned']:,} of {summary['rows']:,} rows ({aims}, seed {seed}) in "
               f"{summary['seconds']:.1f}s")
    typer.echo(f"dataset  {Path(summary['out']) / 'data.csv'} (column is_poisoned marks them)")
    typer.echo(f"record   {Path(summary['out']) / 'poison_record.parquet'}")
