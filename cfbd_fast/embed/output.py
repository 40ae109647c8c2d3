"""`embed`'s output store: what to do with --out (create, resume, append, replace or refuse), and the commit
record's account of how far the input is embedded."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError
from ..store import COMMIT_RECORD, EmbeddingStore, store_entries
from .models import describe, same_model
from .sources import Source

RECORD_KEY = "embed"

def position_record(source: Source, position: tuple[int, int]) -> dict:
    """The commit record's account of how far the input is embedded (`EmbeddingStore.completion` reads it): the
    resume position, the number of units, and inputs read so far of how many (None when not known up front)."""
    unit, offset = position
    before = [u.expected for u in source.units[:unit]]
    done = None if any(c is None for c in before) else sum(before) + offset
    return {"position": [unit, offset], "units": len(source.units), "inputs_done": done,
            "inputs_total": source.expected}

def inputs_left(source: Source, position: tuple[int, int]) -> int | None:
    unit, offset = position
    counts = [u.expected for u in source.units[unit:]]
    if any(c is None for c in counts):
        return None
    return max(0, sum(counts) - offset)

def _same_input(old: dict, new: dict) -> bool:
    """Same data and options; the path may differ (a moved folder with the same contents still resumes)."""
    return {k: v for k, v in old.items() if k != "path"} == {k: v for k, v in new.items() if k != "path"}

def _describe_input(identity: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in identity.items() if k not in ("kind", "path", "fingerprint"))
    return f"{identity.get('kind')} {identity.get('path')} ({options + ', ' if options else ''}" \
           f"fingerprint {str(identity.get('fingerprint'))[:12]})"

def plan_out(out: Path, source: Source, identity: dict, dtype: str, overwrite: bool,
              append: bool) -> tuple[str, tuple[int, int]]:
    """What to do with OUT, decided (and refused) before the model loads: "create", "replace" (--overwrite),
    "resume" at a position, or "append" (another input after the existing rows)."""
    if not store_entries(out):
        return "create", (0, 0)
    if overwrite:
        if not ((out / COMMIT_RECORD).is_file() or any(out.glob("*.emb"))):
            raise InputError(f"{out} is not a cfbd store; --overwrite only replaces stores: choose another --out")
        return "replace", (0, 0)
    with EmbeddingStore.open(out) as store:
        body = store.record
        rows = len(store)
    record = body.get(RECORD_KEY)
    if record is not None:
        old_model = record.get("model", {})
        model_matches = same_model(old_model, identity)
    else:
        old_model = {"name": body["model"] or "an unknown model", "pretrained": body["pretrained"], "dim": body["dim"]}
        model_matches = (body["model"] == identity["name"] and body["pretrained"] == identity["pretrained"]
                         and body["dim"] == identity["dim"])
    if not model_matches:
        raise InputError(f"{out} holds embeddings of {describe(old_model)}; this run embeds {describe(identity)}. "
                         "Vectors of different models cannot share a store: choose another --out, or pass "
                         "--overwrite to replace it")
    if body["dtype"] != dtype:
        raise InputError(f"{out} stores {body['dtype']} vectors; this run asks for {dtype}: pass --dtype "
                         f"{body['dtype']} to continue it, or --overwrite")
    if record is not None and _same_input(record["input"], source.identity()):
        return "resume", tuple(record["position"])
    if not append:
        what = (f"was embedded from {_describe_input(record['input'])}" if record is not None
                else "holds rows not written by cfbd-fast embed")
        raise InputError(f"{out} {what}, not from {_describe_input(source.identity())}: pass --append to add "
                         f"these rows after its {rows}, --overwrite to start over, or choose another --out")
    return "append", (0, 0)

def open_out(out: Path, action: str, source: Source, identity: dict, dtype: str) -> EmbeddingStore:
    """Open OUT for writing as `plan_out` decided, once the model has loaded."""
    fresh = {"input": source.identity(), "model": identity, **position_record(source, (0, 0)), "first_row": 0}
    if action in ("resume", "append"):
        store = EmbeddingStore.open(out, mode="a")
        if action == "append":
            store.append(record={RECORD_KEY: {**fresh, "first_row": len(store)}})
        return store
    if action == "replace":
        for entry in store_entries(out):  # the lock file stays: this process holds it
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return EmbeddingStore.create(out, dim=identity["dim"], dtype=dtype, model=identity["name"],
                                 pretrained=identity["pretrained"], normalized=True, record={RECORD_KEY: fresh})
