"""`cfbd-fast store`: inspect embedding stores and import .npy files or clip-retrieval folders."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import Json, Quiet

app = typer.Typer(no_args_is_help=True, help="Create, import and inspect embedding stores (NAME.cfbd/).")


class DTypeName(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


Out = Annotated[Path, typer.Argument(help="The new store directory, e.g. data.cfbd (must not exist).")]
Model = Annotated[Optional[str], typer.Option(help="Embedding model name to record, e.g. ViT-L-14.")]
Pretrained = Annotated[Optional[str], typer.Option(help="Pretrained tag to record, e.g. openai.")]
DType = Annotated[Optional[DTypeName], typer.Option(help="Store dtype [default: the source's, float32 if wider].")]
Normalized = Annotated[Optional[bool], typer.Option(
    "--normalized/--not-normalized", help="Record whether rows are L2-normalised [default: check every row].")]


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _print_info(info: dict, health: dict | None) -> None:
    model = info["model"] or "unknown"
    if info["pretrained"]:
        model += f" ({info['pretrained']})"
    lines = [
        ("path", info["path"]),
        ("rows", f"{info['rows']:,}"),
        ("skipped", f"{info.get('skipped', 0):,} inputs in the skip list"),
        ("dim", info["dim"]),
        ("dtype", info["dtype"]),
        ("matrices", ", ".join(info["matrices"])),
        ("model", model),
        ("normalized", "yes" if info["normalized"] else "no"),
        ("size", _human_bytes(info["size_bytes"])),
        ("format", f"v{info['format_version']} (written by cfbd-fast {info['cfbd_fast_version']})"),
        ("fingerprint", info["fingerprint"]),
    ]
    if not info["complete"]:
        lines.insert(1, ("status", incomplete_note(info["inputs_done"], info["inputs_total"])))
    for name, counts in (health or {}).items():
        lines.append((f"{name} health", f"{counts['nonfinite_rows']:,} rows with NaN/inf, "
                                        f"{counts['zero_norm_rows']:,} rows of zero norm"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        typer.echo(f"{key:<{width}}  {value}")


def incomplete_note(done: int | None, total: int | None) -> str:
    """How `store info` describes a store whose embedding was stopped before the end of its input."""
    at = f"row {done:,}" if done is not None else "a row"
    of = f" of {total:,}" if total is not None else ""
    return f"incomplete: embedding stopped at {at}{of} (rerun the same command to resume)"


def _report(store, json_output: bool, health: dict | None = None) -> None:
    info = store.info
    if json_output:
        typer.echo(json.dumps({**info, **({"health": health} if health is not None else {})}, indent=2))
    else:
        _print_info(info, health)


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A store directory (NAME.cfbd).")],
    health: Annotated[bool, typer.Option("--health/--no-health",
                                         help="Count rows with NaN/inf or zero norm (reads every row).")] = True,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Rows, dim, dtype, model, size and row health of a store."""
    from ..store import EmbeddingStore

    from ..store.verify import verify as verify_store

    with EmbeddingStore.open(path) as store:
        counts = verify_store(store, progress=not quiet)["health"] if health else None  # parts checked too
        _report(store, json_output, counts)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A store directory (NAME.cfbd).")],
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Check every part's size and CRC against the commit record and read every row; exit 1 naming a bad file."""
    from ..store import EmbeddingStore
    from ..store.verify import verify as verify_store

    with EmbeddingStore.open(path) as store:
        result = verify_store(store, progress=not quiet)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"ok  {result['path']}: {result['rows']:,} rows, {result['files_checked']} files checked (the commit "
               f"record, {len(result['health'])} matrices, {result['parts_checked']} parts by CRC)")
    if not result["complete"]:
        typer.echo(f"    {incomplete_note(result['inputs_done'], result['inputs_total'])}")


@app.command()
def skips(
    path: Annotated[Path, typer.Argument(help="A store directory (NAME.cfbd).")],
    json_output: Json = False,
) -> None:
    """List the inputs a writer could not embed (the skip list): key, source, reason, detail."""
    from ..store import EmbeddingStore

    with EmbeddingStore.open(path) as store:
        rows = store.skipped.to_pylist()
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"{path}: the skip list is empty")
        return
    columns = list(rows[0])
    cells = [[("" if row[c] is None else str(row[c])).replace("\n", " ") for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        typer.echo("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())


@app.command("from-npy")
def from_npy(
    out: Out,
    image: Annotated[Path, typer.Option("--image", help="Image embeddings, a 2-D .npy file.")],
    text: Annotated[Path, typer.Option("--text", help="Caption embeddings, a 2-D .npy file row-aligned with --image.")],
    meta: Annotated[Optional[Path], typer.Option(
        "--meta", help="Parquet with `caption` and `key` (or `image_path`/`url`), optional `is_poisoned`.")] = None,
    model: Model = None,
    pretrained: Pretrained = None,
    dtype: DType = None,
    normalized: Normalized = None,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Write two row-aligned .npy matrices (and optional metadata) to a new store."""
    from ..importers import from_npy as import_npy

    with import_npy(image, text, out, meta_parquet=meta, model=model, pretrained=pretrained, normalized=normalized,
                    dtype=dtype.value if dtype else None, progress=not quiet) as store:
        _report(store, json_output)


@app.command("import-clip-retrieval")
def import_clip_retrieval(
    src: Annotated[Path, typer.Argument(help="clip-retrieval output folder (img_emb/, text_emb/, metadata/).")],
    out: Out,
    model: Model = None,
    pretrained: Pretrained = None,
    dtype: DType = None,
    normalized: Normalized = None,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Import a clip-retrieval inference folder into a new store."""
    from ..importers import import_clip_retrieval as import_folder

    with import_folder(src, out, model=model, pretrained=pretrained, normalized=normalized,
                       dtype=dtype.value if dtype else None, progress=not quiet) as store:
        _report(store, json_output)


@app.command("import-datacomp")
def import_datacomp(
    src: Annotated[Path, typer.Argument(help="DataComp-style shards: NNNNNNNN.npz features beside NNNNNNNN.parquet "
                                             "metadata (uid, text, url).")],
    out: Out,
    features: Annotated[str, typer.Option(help="Feature prefix in the .npz files: FEATURES_img and FEATURES_txt, "
                                               "e.g. l14 or b32.")] = "l14",
    model: Model = None,
    pretrained: Pretrained = None,
    dtype: DType = None,
    normalized: Normalized = None,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Import a DataComp-style pool (checked: pairs, dimension, row counts, unique uids) into a new store keyed by
    uid, so that `cfbd-fast filter --format datacomp-uids` writes the pool's subset file."""
    from ..importers_datacomp import import_datacomp as import_pool

    with import_pool(src, out, features=features, model=model, pretrained=pretrained, normalized=normalized,
                     dtype=dtype.value if dtype else None, progress=not quiet) as store:
        _report(store, json_output)
