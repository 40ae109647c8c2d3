"""How the scan's chunks reach the device and its per-row results come back, without a synchronisation per chunk.

`ChunkFeeder` turns the store's chunks into device tensors. Staged (the CUDA default), it fills one of two host
buffers (pinned on CUDA) from the chunk, copies it to the device on a copy stream and hands the chunk to the
compute stream behind an event; a buffer is refilled only after the chunk it held was released, so the copy of
chunk k + 1 and the read of chunk k + 2 overlap the kernels of chunk k. Unstaged (the CPU default), it hands the
chunk's arrays through as tensors. Both run the same ordering code, which CPU tests exercise with staging on.

`ResidentMatrix` keeps one matrix on the device between the passes when it fits in a share of the free device
memory (`plan_resident`); `DeviceOutputs` collects per-row results on the device and brings them back once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from .. import ops

SLOTS = 2  # staging buffers: one being filled and copied while the other's chunk is computed on
DEFAULT_CUDA_SHARE = 0.5  # share of the free device memory a resident text matrix may take by default


@dataclass
class DeviceChunk:
    """Rows [start, stop) of some matrices as tensors on the scan's device (views: valid until the next chunk)."""
    start: int
    stop: int
    arrays: dict[str, torch.Tensor]

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None


class _Streams:
    """The copy stream and the compute stream with their events on CUDA; on CPU, work is done when it is issued,
    so waits return at once and the same calls order nothing."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.copy = torch.cuda.Stream(device)

    def event(self):
        return torch.cuda.Event() if self.cuda else None

    def record_on_copy(self, event) -> None:
        if self.cuda:
            event.record(self.copy)

    def record_on_compute(self, event) -> None:
        if self.cuda:
            event.record(self.compute)

    def copy_waits(self, event) -> None:
        if self.cuda:
            self.copy.wait_event(event)

    def compute_waits(self, event) -> None:
        if self.cuda:
            self.compute.wait_event(event)

    def host_waits(self, event) -> None:
        if self.cuda:
            event.synchronize()

    def copy_context(self):
        if self.cuda:
            return torch.cuda.stream(self.copy)
        import contextlib

        return contextlib.nullcontext()


class _Slot:
    """One staging buffer per matrix (host, pinned on CUDA), its device twin, and the events that guard reuse."""

    def __init__(self, index: int, streams: _Streams):
        self.index = index
        self.host: dict[str, torch.Tensor] = {}
        self.device: dict[str, torch.Tensor] = {}
        self.copied = streams.event()  # recorded on the copy stream after the host -> device copy
        self.released = streams.event()  # recorded on the compute stream after the last kernel using the chunk
        self.chunk = None  # index of the chunk the slot holds


class ChunkFeeder:
    """Feeds a pass its chunks as device tensors, staged through double buffers or handed through.

    `staged=None` stages on CUDA and hands through on CPU; `staged=True` on CPU runs the staging order with plain
    host buffers (what the tests use). `keep={"text": ResidentMatrix}` also places that matrix's rows in the
    resident matrix, from which later passes read it. `trace`, when a list, receives (event, chunk, slot) tuples:
    "fill" (host buffer written), "copy" (device copy issued), "yield", "release".
    """

    def __init__(self, device: str | torch.device, *, staged: bool | None = None,
                 keep: dict[str, "ResidentMatrix"] | None = None, trace: list | None = None):
        self.device = torch.device(device)
        self.staged = self.device.type == "cuda" if staged is None else bool(staged)
        self.keep = dict(keep or {})
        self.trace = trace
        self._streams = _Streams(self.device)
        self._slots = [_Slot(i, self._streams) for i in range(SLOTS)]

    def feed(self, chunks: Iterable) -> Iterator[DeviceChunk]:
        """Device chunks for the store's chunks, in order; a chunk's tensors are reused after the next is asked for."""
        pending = None
        for index, chunk in enumerate(chunks):
            ready = self._issue(index, chunk)
            if pending is not None:
                yield from self._hand_over(pending)
            pending = ready
        if pending is not None:
            yield from self._hand_over(pending)

    # -- the ordering: fill a slot once its copy finished, copy once its last chunk was released ----------------
    def _issue(self, index: int, chunk) -> tuple:
        start, stop = chunk.start, chunk.stop
        arrays = {name: ops.as_tensor(array, name) for name, array in chunk.arrays.items()}
        if not self.staged:
            out = {}
            for name, tensor in arrays.items():
                tensor = tensor.to(self.device)
                if name in self.keep:
                    self.keep[name].put(start, stop, tensor)
                    tensor = self.keep[name].slice(start, stop)
                out[name] = tensor
            return index, None, DeviceChunk(start, stop, out)
        slot = self._slots[index % SLOTS]
        streams = self._streams
        streams.host_waits(slot.copied)  # the host buffer's previous copy has left it
        rows = stop - start
        for name, tensor in arrays.items():
            host = self._buffer(slot.host, name, tensor, pinned=streams.cuda, device=torch.device("cpu"))
            host[:rows].copy_(tensor)
        self._log("fill", index, slot)
        out = {}
        streams.copy_waits(slot.released)  # the device buffer's previous chunk is no longer read
        with streams.copy_context():
            for name, tensor in arrays.items():
                host = slot.host[name][:rows]
                if name in self.keep:
                    target = self.keep[name].slice(start, stop)
                elif streams.cuda:
                    target = self._buffer(slot.device, name, tensor, pinned=False, device=self.device)[:rows]
                else:
                    target = host  # staged on CPU: the host buffer is what the kernels read
                if target.data_ptr() != host.data_ptr():
                    target.copy_(host, non_blocking=True)
                out[name] = target
        streams.record_on_copy(slot.copied)
        slot.chunk = index
        self._log("copy", index, slot)
        return index, slot, DeviceChunk(start, stop, out)

    def _hand_over(self, ready: tuple) -> Iterator[DeviceChunk]:
        index, slot, chunk = ready
        if slot is not None:
            self._streams.compute_waits(slot.copied)
        self._log("yield", index, slot)
        yield chunk
        # The consumer asked for the next chunk: every kernel reading this one has been issued.
        if slot is not None:
            self._streams.record_on_compute(slot.released)
        self._log("release", index, slot)

    def _buffer(self, buffers: dict, name: str, like: torch.Tensor, *, pinned: bool, device) -> torch.Tensor:
        buffer = buffers.get(name)
        if buffer is None or buffer.shape[0] < like.shape[0] or buffer.shape[1:] != like.shape[1:] \
                or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, device=device, pin_memory=pinned)
            buffers[name] = buffer
        return buffer

    def _log(self, event: str, index: int, slot) -> None:
        if self.trace is not None:
            self.trace.append((event, index, None if slot is None else slot.index))


class ResidentMatrix:
    """One (rows, dim) matrix kept on the device: filled by a `ChunkFeeder` in one pass, read by later ones."""

    def __init__(self, rows: int, dim: int, dtype: torch.dtype, device: str | torch.device):
        self.data = torch.empty((rows, dim), dtype=dtype, device=device)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop]

    def put(self, start: int, stop: int, rows: torch.Tensor) -> None:
        self.data[start:stop].copy_(rows)

    def chunks(self, name: str, rows: int) -> Iterator[DeviceChunk]:
        for start in range(0, self.data.shape[0], rows):
            stop = min(start + rows, self.data.shape[0])
            yield DeviceChunk(start, stop, {name: self.data[start:stop]})


def free_memory(device: str | torch.device) -> int:
    """Bytes free on the device: CUDA's free memory, or the host's available memory for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # Linux: free pages plus the page cache the kernel can drop (free pages alone miss the cache)
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):  # not available on this platform
        return 0


def resolved_share(share: float | None, device: str | torch.device) -> float:
    """The share of free device memory a resident matrix may take: as given, or the device's default (CUDA: 0.5;
    CPU: 0, since the store's pages are already host memory)."""
    if share is not None:
        return float(share)
    return DEFAULT_CUDA_SHARE if torch.device(device).type == "cuda" else 0.0


def plan_resident(rows: int, dim: int, itemsize: int, device: str | torch.device, share: float | None,
                  free_bytes: int | None = None) -> bool:
    """Whether a (rows, dim) matrix of `itemsize` bytes fits in `share` of the free device memory."""
    share = resolved_share(share, device)
    if share <= 0:
        return False
    free = free_memory(device) if free_bytes is None else free_bytes
    return rows * dim * itemsize <= share * free


class DeviceOutputs:
    """Per-row float32 results filled chunk by chunk on the device and brought back to numpy once.

    On CPU the tensors are views of the numpy arrays, so nothing is copied.
    """

    def __init__(self, rows: int, names: Iterable[str], device: str | torch.device, fill: float = float("nan"),
                 columns: int | None = None):
        self.device = torch.device(device)
        shape = (rows,) if columns is None else (rows, columns)
        self.host = {name: np.full(shape, fill, dtype=np.float32) for name in names}
        if self.device.type == "cpu":
            self.tensors = {name: torch.from_numpy(array) for name, array in self.host.items()}
        else:
            self.tensors = {name: torch.full(shape, fill, dtype=torch.float32, device=self.device)
                            for name in self.host}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def numpy(self) -> dict[str, np.ndarray]:
        """The results as numpy arrays (one device-to-host copy per array; waits for the kernels)."""
        if self.device.type != "cpu":
            for name, tensor in self.tensors.items():
                self.host[name][...] = tensor.cpu().numpy()
        return self.host
