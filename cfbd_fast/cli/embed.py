"""`cfbd-fast embed`: image-caption pairs (CSV/TSV, img2dataset folder, webdataset shards) -> an embedding store."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import Device, Json, Quiet
from .store import DTypeName


def embed(
    data: Annotated[str, typer.Argument(
        help="A CSV/TSV with image paths (relative to the file) and captions, an img2dataset output folder "
             "(files format), or webdataset .tar shards: a folder, one .tar or a quoted glob.")],
    out: Annotated[Path, typer.Option("--out", help="The store directory, e.g. data.cfbd: created, or continued "
                                                    "after its last commit when it holds this input and model.")],
    model: Annotated[str, typer.Option(help="open_clip model name (ViT-B-32, ...), cfbd-tiny (tests), or "
                                            "local-dir:PATH (a folder with open_clip_config.json and weights).")],
    pretrained: Annotated[Optional[str], typer.Option(
        help="open_clip pretrained tag (e.g. openai; downloaded by open_clip), a local .pt/.safetensors "
             "checkpoint, or none for seeded random weights. Not used with local-dir:.", show_default="none")] = None,
    image_column: Annotated[str, typer.Option(help="CSV/TSV column with image paths.")] = "image",
    caption_column: Annotated[str, typer.Option(help="CSV/TSV (or img2dataset parquet) caption column.")] = "caption",
    batch_size: Annotated[int, typer.Option(help="Images per model batch.")] = 128,
    workers: Annotated[Optional[int], typer.Option(
        help="DataLoader worker processes that decode and preprocess.",
        show_default="available cores - 1")] = None,
    device: Annotated[Optional[Device], typer.Option(help="Where the model runs.",
                                                     show_default="cuda if available")] = None,
    gpu_decode: Annotated[Optional[bool], typer.Option(
        "--gpu-decode/--cpu-decode", help="Decode JPEGs with nvJPEG on the GPU.",
        show_default="on with --device cuda")] = None,
    dtype: Annotated[DTypeName, typer.Option(help="Store dtype.")] = DTypeName.float16,
    commit_rows: Annotated[int, typer.Option(
        help="Inputs per commit: a killed run loses at most this many and resumes after the last commit.")] = 4096,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store at --out.")] = False,
    append: Annotated[bool, typer.Option(
        "--append", help="Add this input's rows after those of another input already in --out (same model).")] = False,
    distributed: Annotated[Optional[bool], typer.Option(
        "--distributed/--no-distributed", help="Run as one rank of torch.distributed (torchrun --nproc-per-node N): "
        "each rank embeds its round-robin share of the .tar shards, each into OUT/<shard>.cfbd.",
        show_default="when torchrun started it")] = None,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Embed images and captions with open_clip into a store (resumable; unusable images go to its skip list)."""
    from ..embed import embed as run_embed
    from ..embed.models import HF_HUB, LOCAL_DIR, TINY_MODEL, is_random, model_identity
    from ..distributed.comm import ranks_launched

    model_identity(model, pretrained)  # a bad model or checkpoint fails here, before the note below
    if distributed or (distributed is None and ranks_launched()):
        from ._distributed import embed_ranks

        return embed_ranks(data, out, model, pretrained, distributed=distributed, timeout=1800.0,
                           json_out=json_output, image_column=image_column, caption_column=caption_column,
                           batch_size=batch_size, workers=workers, device=device.value if device else None,
                           dtype=dtype.value, commit_rows=commit_rows, gpu_decode=gpu_decode, overwrite=overwrite,
                           append=append, progress=not quiet)
    if is_random(pretrained) and not model.startswith((LOCAL_DIR, HF_HUB)) and model != TINY_MODEL:
        typer.echo(f"Note: no --pretrained weights: {model} embeds with seeded random weights (for tests and "
                   "benchmarks; pass e.g. --pretrained openai for real embeddings).", err=True)
    summary = run_embed(data, out, model, pretrained, image_column=image_column, caption_column=caption_column,
                        batch_size=batch_size, workers=workers, device=device.value if device else None,
                        dtype=dtype.value, commit_rows=commit_rows, gpu_decode=gpu_decode, overwrite=overwrite,
                        append=append, progress=not quiet)
    if json_output:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    skipped = ", ".join(f"{n:,} {reason}" for reason, n in summary.skipped_by_reason.items())
    lines = [
        ("store", f"{summary.store} ({summary.rows_total:,} rows{', resumed' if summary.resumed else ''})"),
        ("model", f"{summary.model}{f' ({summary.pretrained})' if summary.pretrained else ''}, dim {summary.dim}, "
                  f"{summary.dtype}"),
        ("written", f"{summary.rows_written:,} rows"),
        ("skipped", f"{summary.skipped:,}{f' ({skipped})' if skipped else ''}"),
        ("time", f"{summary.seconds:.1f} s ({summary.samples_per_s:,.0f} samples/s on {summary.device}, "
                 f"decode on {summary.decode}, {summary.workers} workers)"),
    ]
    for key, value in lines:
        typer.echo(f"{key:<8}  {value}")
