"""`embed`: images and captions -> L2-normalised open_clip embeddings in a store, resumably.

The input is cut into commit chunks of `commit_rows` samples per unit (table, shard, tar) and each chunk into
model batches, independently of timing, so a killed run resumed with the same arguments writes exactly the
bytes an uninterrupted run writes. Decoding and preprocessing run in torch DataLoader workers; the model runs
in the main process under inference_mode (fp16 autocast on CUDA, JPEGs decoded there with nvJPEG); results
come back one batch behind the model and commits are written by a background thread, so decoding, the model
and the writes overlap.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from ..errors import InputError
from ..progress import progress_bar
from ..locking import writer_lock
from ..store import EmbeddingStore, dtype_name, store_entries
from ..threads import available_cores, default_threads
from .decode import CpuPreprocess, DecodeError, GpuPreprocess, is_whole_jpeg, read_image_file
from .models import LOCAL_DIR, LoadedModel, is_random, load_model, model_identity
from .commits import _Chunk, _CommitWriter
from .network import offline_when_unreachable
from .output import RECORD_KEY, inputs_left, open_out, plan_out, position_record
from .sources import Sample, Source, open_source

COMMIT_ROWS = 4096
BATCH_SIZE = 128
MAX_BATCH_SIZE, MAX_COMMIT_ROWS, MAX_WORKERS = 1 << 16, 1 << 24, 256


def _check_range(option: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InputError(f"{option} {value}: give a whole number from {low} to {high:,}")


@dataclass
class EmbedSummary:
    """What one `embed` call did; `to_dict()` is the CLI's --json output."""

    store: str
    model: str
    pretrained: str | None
    dim: int
    dtype: str
    device: str
    decode: str  # "cpu" or "gpu+cpu" (JPEGs on the GPU, other formats on CPU)
    workers: int
    batch_size: int
    rows_written: int
    rows_total: int
    inputs_read: int
    skipped: int
    skipped_by_reason: dict[str, int]
    resumed: bool
    seconds: float
    load_seconds: float
    samples_per_s: float
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Task(NamedTuple):
    """One model batch for a loader worker; `commit` is the resume position once the batch's chunk is done."""

    samples: list[Sample]
    commit: tuple[int, int] | None


class _Plan:
    """The deterministic sequence of batches from a resume position: the loader's 'sampler'."""

    def __init__(self, source: Source, position: tuple[int, int], commit_rows: int, batch_size: int):
        self.source, self.position, self.commit_rows, self.batch_size = source, position, commit_rows, batch_size

    def __iter__(self) -> Iterator[_Task]:
        end = object()
        first_unit, first_offset = self.position
        for unit_index in range(first_unit, len(self.source.units)):
            offset = first_offset if unit_index == first_unit else 0
            items = self.source.units[unit_index].items(offset)
            pending = next(items, end)
            while pending is not end:
                left = self.commit_rows
                while left and pending is not end:
                    batch = []
                    while len(batch) < min(self.batch_size, left) and pending is not end:
                        batch.append(pending)
                        pending = next(items, end)
                    left -= len(batch)
                    offset += len(batch)
                    closes = left == 0 or pending is end
                    commit = ((unit_index + 1, 0) if pending is end else (unit_index, offset)) if closes else None
                    yield _Task(batch, commit)


class _BatchDecoder(torch.utils.data.Dataset):
    """Runs in loader workers: reads and decodes a batch's images (to uint8, see CpuPreprocess), tokenizes its
    captions; with `keep_jpeg`, JPEG bytes are passed on undecoded for the GPU."""

    def __init__(self, preprocess: CpuPreprocess, tokenizer, keep_jpeg: bool):
        self.preprocess, self.tokenizer, self.keep_jpeg = preprocess, tokenizer, keep_jpeg

    def __len__(self) -> int:  # the plan is a stream; the loader never asks for a length
        raise TypeError("a streamed plan has no length")

    def __getitem__(self, task: _Task) -> dict:
        started = time.perf_counter()
        pixels, encoded, on_gpu, kept, skips = [], [], [], [], []
        for sample in task.samples:
            if sample.skip is not None:
                skips.append((sample.key, sample.source, *sample.skip))
                continue
            try:
                data = sample.image_bytes if sample.image_bytes is not None else read_image_file(sample.image_path)
                if self.keep_jpeg and is_whole_jpeg(data):
                    encoded.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    on_gpu.append(True)
                else:
                    pixels.append(self.preprocess(data))
                    on_gpu.append(False)
            except DecodeError as exc:
                skips.append((sample.key, sample.source, exc.reason, exc.detail))
                continue
            kept.append((sample.key, sample.source, sample.caption, sample.is_poisoned))
        tokens = self.tokenizer([caption for _, _, caption, _ in kept]) if kept else None
        return {"pixels": torch.stack(pixels) if pixels else None, "encoded": encoded, "on_gpu": on_gpu,
                "tokens": tokens, "kept": kept, "skips": skips, "commit": task.commit, "inputs": len(task.samples),
                "decode_s": time.perf_counter() - started}


def _unbatched(item: Any) -> Any:
    return item


def downloads(model: str, pretrained: str | None) -> bool:
    """Whether loading the model may download: a pretrained tag (not a local file), or a hub model."""
    if model.startswith("hf-hub:"):
        return True
    return not is_random(pretrained) and not model.startswith(LOCAL_DIR) and not Path(pretrained).is_file()


def default_workers() -> int:
    """Loader workers: every available core but one for the main process (none on a single core), at most 16."""
    return max(0, min(available_cores() - 1, 16))


def embed(data: str | os.PathLike, out: str | os.PathLike, model: str, pretrained: str | None = None, *,
          image_column: str = "image", caption_column: str = "caption", batch_size: int = BATCH_SIZE,
          workers: int | None = None, device: str | None = None, dtype: str = "float16",
          commit_rows: int = COMMIT_ROWS, gpu_decode: bool | None = None, overwrite: bool = False,
          append: bool = False, progress: bool = False) -> EmbedSummary:
    """Embed the image-caption pairs of DATA with an open_clip model into the store OUT (created or resumed).

    DATA: a CSV/TSV with image paths (relative to the file) and captions, an img2dataset `files` folder, or
    webdataset .tar shards (a folder, one file or a glob). `pretrained`: an open_clip tag, a local checkpoint,
    or None/"none" for seeded random weights. An existing OUT written from the same input and model is
    continued after its last commit; another input needs `append=True` (rows go after the existing ones) or
    `overwrite=True`; another model is always refused unless `overwrite=True`.
    """
    started = time.perf_counter()
    _check_range("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    _check_range("--commit-rows", commit_rows, 1, MAX_COMMIT_ROWS)
    if workers is not None:
        _check_range("--workers", workers, 0, MAX_WORKERS)
    if overwrite and append:
        raise InputError("--overwrite and --append exclude each other: choose one")
    dtype = dtype_name(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu")
    workers = default_workers() if workers is None else workers

    source = open_source(data, image_column=image_column, caption_column=caption_column)
    with offline_when_unreachable(downloads(model, pretrained)):
        identity = model_identity(model, pretrained)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; --out names a store directory (e.g. data.cfbd)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out, "store"):
        try:
            return _embed_locked(source, out, identity, model, pretrained, started, dtype=dtype, device=device,
                                 workers=workers, batch_size=batch_size, commit_rows=commit_rows,
                                 gpu_decode=gpu_decode, overwrite=overwrite, append=append, progress=progress)
        finally:
            if created and not store_entries(out):
                shutil.rmtree(out, ignore_errors=True)  # nothing was written: leave no empty folder behind


def _embed_locked(source: Source, out: Path, identity: dict, model: str, pretrained: str | None, started: float, *,
                  dtype: str, device: str, workers: int, batch_size: int, commit_rows: int, gpu_decode: bool | None,
                  overwrite: bool, append: bool, progress: bool) -> EmbedSummary:
    """`embed` once OUT's writer lock is held: plan, load the model, write."""
    action, position = plan_out(out, source, identity, dtype, overwrite, append)
    threads = torch.get_num_threads()
    if device == "cpu":
        # The model gets the cores that the workers and other busy processes leave (spinning threads on busy
        # cores make a CPU model many times slower). Outputs depend on batch composition, which the plan
        # fixes, but not on the thread count (1 and 2 threads write identical bytes for cfbd-tiny and
        # ViT-B-32), so a resumed run under another load still writes the same store.
        torch.set_num_threads(max(1, default_threads() - workers))
    try:
        with offline_when_unreachable(downloads(model, pretrained)):
            loaded = load_model(model, pretrained, device=device)
        load_seconds = time.perf_counter() - started
        gpu = device.startswith("cuda") and (gpu_decode is not False) and GpuPreprocess.supports(loaded.preprocess_cfg)
        if gpu_decode and not gpu:
            raise InputError("--gpu-decode needs a CUDA device and a model whose preprocessing resizes the "
                             "shortest side to a square (or squashes)")
        with open_out(Path(out), action, source, identity, dtype) as store:
            counts = _run(store, source, loaded, position, batch_size, workers, commit_rows, gpu, progress)
            rows_total = len(store)
    finally:
        torch.set_num_threads(threads)
    loop_seconds = counts.pop("loop_s")
    seconds = time.perf_counter() - started
    return EmbedSummary(
        store=str(out), model=identity["name"], pretrained=identity["pretrained"], dim=identity["dim"],
        dtype=dtype, device=device, decode="gpu+cpu" if gpu else "cpu", workers=workers, batch_size=batch_size,
        rows_written=counts["rows"], rows_total=rows_total, inputs_read=counts["inputs"],
        skipped=sum(counts["skipped"].values()), skipped_by_reason=dict(sorted(counts["skipped"].items())),
        resumed=action == "resume", seconds=round(seconds, 3), load_seconds=round(load_seconds, 3),
        samples_per_s=round(counts["inputs"] / loop_seconds, 1) if loop_seconds > 0 else 0.0,
        timings={k: round(v, 3) for k, v in counts["timings"].items()} | {"loop_s": round(loop_seconds, 3)})


def _run(store: EmbeddingStore, source: Source, loaded: LoadedModel, position: tuple[int, int], batch_size: int,
         workers: int, commit_rows: int, gpu: bool, progress: bool) -> dict:
    """The loop: decode (loader workers, nvJPEG on CUDA) -> model -> results -> commits, overlapped.

    A batch's embeddings are copied back to pinned host memory without waiting and collected one batch later, so
    the device runs batch k + 1 while the host files batch k; commits are written by one background thread while
    the next chunk is embedded (one commit in flight; commits stay in order).
    """
    cuda = loaded.device.startswith("cuda")
    record = store.record[RECORD_KEY]
    plan = _Plan(source, position, commit_rows, batch_size)
    cpu_preprocess = CpuPreprocess(loaded.preprocess)
    decoder = _BatchDecoder(cpu_preprocess, loaded.tokenizer, keep_jpeg=gpu)
    loader = torch.utils.data.DataLoader(decoder, batch_size=None, sampler=plan, num_workers=workers,
                                         collate_fn=_unbatched, pin_memory=cuda)
    gpu_preprocess = GpuPreprocess(loaded.preprocess_cfg, loaded.device, loaded.preprocess) if gpu else None
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
    timings = Counter()
    skipped = Counter()
    done = {"rows": 0, "inputs": 0}
    state = {"chunk": _Chunk(source.has_poison_labels)}
    remaining = inputs_left(source, position)
    loop_started = time.perf_counter()

    def file(batch: "_Pending") -> None:
        """Add a finished batch to its commit chunk (in input order) and hand a full chunk to the writer."""
        tick = time.perf_counter()
        if batch.kept:
            image, text = batch.arrays()
            state["chunk"].add(image, text, batch.kept)
        timings["results_s"] += time.perf_counter() - tick
        state["chunk"].skips.extend(batch.skips)
        skipped.update(reason for _, _, reason, _ in batch.skips)
        done["rows"] += len(batch.kept)
        done["inputs"] += batch.inputs
        if batch.commit is not None:
            tick = time.perf_counter()
            writer.submit(state["chunk"], {**record, "input": source.identity(),
                                           **position_record(source, batch.commit)})
            timings["write_wait_s"] += time.perf_counter() - tick
            state["chunk"] = _Chunk(source.has_poison_labels)
        bar.advance(batch.inputs)

    with progress_bar("embedding", total=remaining, enabled=progress, unit="samples", rate=True) as bar, \
            torch.inference_mode(), _CommitWriter(store, timings) as writer:
        pending = None
        waited = time.perf_counter()
        for result in loader:
            now = time.perf_counter()
            timings["wait_s"] += now - waited
            timings["decode_s"] += result["decode_s"]
            tick = time.perf_counter()
            pixels, rows, skips = _assemble(result, cpu_preprocess, gpu_preprocess, loaded.device, timings)
            timings["normalize_s"] += time.perf_counter() - tick
            kept = [result["kept"][i] for i in rows]
            batch = _Pending(kept, skips, result["inputs"], result["commit"])
            if kept:
                tick = time.perf_counter()
                tokens = result["tokens"] if len(rows) == len(result["kept"]) else result["tokens"][rows]
                with autocast:
                    image = loaded.model.encode_image(pixels)
                    text = loaded.model.encode_text(_trim_padding(loaded.model, tokens).to(loaded.device,
                                                                                         non_blocking=True))
                batch.start_copy(torch.nn.functional.normalize(image.float(), dim=-1),
                                 torch.nn.functional.normalize(text.float(), dim=-1))
                timings["model_s"] += time.perf_counter() - tick
            if pending is not None:
                file(pending)
            pending = batch
            waited = time.perf_counter()
        if pending is not None:
            file(pending)
    return {"rows": done["rows"], "inputs": done["inputs"], "skipped": skipped, "timings": timings,
            "loop_s": time.perf_counter() - loop_started}


def _trim_padding(model, tokens: torch.Tensor) -> torch.Tensor:
    """Drop the columns that are padding in every row, for a Hugging Face text tower: it masks padding (attention
    and pooling), so the embeddings are those of the full context at a fraction of the cost (captions are ~20 of
    77 tokens). open_clip's own causal towers add positional terms for the full context and are left as they are."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    if not isinstance(text, HFTextEncoder) or getattr(text.pooler, "cls_token_position", 0) < 0:
        return tokens
    used = (tokens != text.config.pad_token_id).any(0).nonzero()
    return tokens[:, :int(used[-1]) + 1] if len(used) else tokens


class _Pending:
    """One model batch on its way back: embeddings copied to pinned host memory behind an event (CUDA), or
    already on the host (CPU); its samples, skips, input count and the commit it closes, if any."""

    def __init__(self, kept: list, skips: list, inputs: int, commit):
        self.kept, self.skips, self.inputs, self.commit = kept, skips, inputs, commit
        self._image = self._text = self._event = None

    def start_copy(self, image: torch.Tensor, text: torch.Tensor) -> None:
        if image.device.type != "cuda":
            self._image, self._text = image.numpy(), text.numpy()
            return
        self._image = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
        self._text = torch.empty(text.shape, dtype=text.dtype, pin_memory=True)
        self._image.copy_(image, non_blocking=True)
        self._text.copy_(text, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
            return self._image.numpy(), self._text.numpy()
        return self._image, self._text


def _assemble(result: dict, cpu_preprocess: CpuPreprocess, gpu_preprocess: GpuPreprocess | None, device: str,
              timings: Counter) -> tuple[torch.Tensor | None, list[int], list]:
    """The batch's normalised pixels on the device in input order (CPU-decoded rows plus GPU-decoded JPEGs), the
    indices of the decoded samples in `result["kept"]`, and the skip entries (the worker's plus undecodable
    JPEGs)."""
    skips = list(result["skips"])
    cpu_pixels = result["pixels"]
    if cpu_pixels is not None:
        cpu_pixels = cpu_preprocess.finish(cpu_pixels.to(device, non_blocking=True))
    if not result["encoded"]:
        return cpu_pixels, list(range(len(result["kept"]))), skips
    tick = time.perf_counter()
    decoded = iter(gpu_preprocess(result["encoded"]))
    cpu_rows = iter(cpu_pixels if cpu_pixels is not None else [])
    pixels, rows = [], []
    for index, (item, on_gpu) in enumerate(zip(result["kept"], result["on_gpu"])):
        row = next(decoded) if on_gpu else next(cpu_rows)
        if isinstance(row, DecodeError):
            skips.append((item[0], item[1], row.reason, row.detail))
            continue
        pixels.append(row)
        rows.append(index)
    timings["gpu_decode_s"] += time.perf_counter() - tick
    return (torch.stack(pixels) if pixels else None), rows, skips
