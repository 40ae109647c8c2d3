"""`cfbd-fast train-mapper`: train the mapping network F on clean reference pairs and save it as safetensors + JSON."""
from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import Device, Json, Quiet


class Loss(str, Enum):
    cosine = "cosine"
    infonce = "infonce"


def train_mapper(
    store: Annotated[Path, typer.Argument(help="Store of clean image-caption pairs (NAME.cfbd/), embedded with "
                                               "the same model as the stores you will scan.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Mapper file to write, e.g. mapper.safetensors; its "
                                                          "config goes beside it as mapper.json.")],
    depth: Annotated[int, typer.Option(help="Linear layers (1 = a linear map).")] = 2,
    hidden: Annotated[int, typer.Option(help="Width of the hidden layers.")] = 1024,
    loss: Annotated[Loss, typer.Option(help="Cosine loss to the caption, or symmetric InfoNCE in the batch.")]
    = Loss.cosine,
    epochs: Annotated[int, typer.Option(help="Most epochs to train.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Pairs per step.")] = 4096,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    val_fraction: Annotated[float, typer.Option(help="Fraction of pairs held out for early stopping.")] = 0.05,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation loss.")]
    = 3,
    seed: Annotated[int, typer.Option("--random-seed", "--seed",
                                      help="Seed of the split, the initialisation and the batch order.")] = 0,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.cpu,
    max_rows: Annotated[Optional[int], typer.Option(help="Train on a random sample of at most this many pairs "
                                                         "[default: all].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing mapper file.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: the free cores).")]
    = None,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Train the mapping network F (image embedding -> caption embedding) that `scan --mapper PATH` uses."""
    import torch

    from ..errors import InputError
    from ..mapper import save_mapper, train_mapper
    from ..pipeline.source import ChunkSource
    from ..threads import configure_threads

    if not store.exists():
        raise InputError(f"store {store} not found: give a NAME.cfbd directory (see `cfbd-fast store --help`)")
    if device is Device.cuda and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch finds no CUDA device: use --device cpu")
    if out.exists() and not force:
        raise InputError(f"--out {out} exists: pass --force to replace it or choose another name")
    out.parent.mkdir(parents=True, exist_ok=True)
    configure_threads(threads)
    started = time.perf_counter()
    source = ChunkSource(store)
    valid = source.valid_rows()
    mapper = train_mapper(source.store.image, source.store.text, rows=valid, depth=depth, hidden=hidden,
                          loss=loss.value, epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                          patience=patience, seed=seed, device=device.value, progress=not quiet, max_rows=max_rows,
                          **source.embedding_model)
    mapper.config["invalid_rows_skipped"] = int(source.rows - len(valid))
    path = save_mapper(mapper, out)
    seconds = time.perf_counter() - started
    config = mapper.config
    if json_out:
        typer.echo(json.dumps({"mapper": str(path), "config_file": str(path.with_suffix(".json")),
                               "seconds": round(seconds, 3), "config": config}, indent=2, sort_keys=True))
        return
    typer.echo(f"mapper   {path} (config {path.with_suffix('.json')})")
    typer.echo(f"network  {config['in_dim']} -> {config['out_dim']}, depth {config['depth']}, hidden "
               f"{config['hidden']}, loss {config['loss']}, model {config['model'] or 'unknown'}")
    typer.echo(f"training {config['train_rows']:,} pairs, validation {config['val_rows']:,}; val loss "
               f"{config['initial_val_loss']:.4f} -> {config['val_loss']:.4f} (best epoch {config['best_epoch']} "
               f"of {config['epochs_run']}{', stopped early' if config['stopped_early'] else ''}) in {seconds:.1f}s")
