"""The scan's collectives: a `Comm` over torch.distributed (gloo on CPU, nccl on CUDA) and its single-process
form, in which every collective is the identity, so that the same stage code runs both ways.

Every collective reduces small numpy arrays (sums, maxima, histograms) or pickles a few small objects; no
per-row array of the dataset passes through here. A peer that dies or stalls makes the collective raise
`DistributedError` (gloo notices a closed connection at once; a stalled peer after `timeout_s`).
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np

from ..errors import CfbdError

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(CfbdError, RuntimeError):
    """A rank died, timed out or could not join: the run has failed and published nothing."""


def launched() -> bool:
    """Whether a launcher (torchrun or another) set the torch.distributed environment of this process."""
    return all(v in os.environ for v in ENV_VARS)


def ranks_launched() -> bool:
    """Whether a launcher started this process as one of more than one rank."""
    return launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1


class Comm:
    """One process alone: rank 0 of 1; every collective returns its input."""

    rank = 0
    world = 1
    backend = "none"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, array, op: str = "reduce sums") -> np.ndarray:
        """Element-wise sum over ranks of a float64 or int64 array (the same shape on every rank)."""
        return np.array(array, copy=True)

    def max(self, array, op: str = "reduce maxima") -> np.ndarray:
        return np.array(array, copy=True)

    def min(self, array, op: str = "reduce minima") -> np.ndarray:
        return np.array(array, copy=True)

    def gather_objects(self, obj, op: str = "gather objects") -> list:
        """A small picklable object from every rank, in rank order, on every rank."""
        return [obj]

    def barrier(self, op: str = "barrier") -> None:
        return None

    def bytes_reduced(self) -> int:
        """Bytes this rank has sent into all-reduces so far (the collective volume)."""
        return 0

    def close(self) -> None:
        return None


class TorchComm(Comm):
    """torch.distributed's default group; the arrays travel as CPU tensors (gloo) or CUDA tensors (nccl)."""

    def __init__(self, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "cpu"):
        import torch
        import torch.distributed as dist

        self._dist = dist
        self._torch = torch
        if backend is None:
            backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
        self.backend = backend
        self._device = "cpu"
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self._device = f"cuda:{local}"
        self._owner = False
        if not dist.is_initialized():
            if not launched():
                raise DistributedError("--distributed needs the torch.distributed environment (RANK, WORLD_SIZE, "
                                       "MASTER_ADDR, MASTER_PORT): start the command with torchrun "
                                       "--nproc-per-node N, or leave --distributed off")
            try:
                dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
            except Exception as exc:  # rendezvous failures come as several exception types
                raise DistributedError(f"could not join the process group ({backend}): {_first_line(exc)}") from exc
            self._owner = True
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._sent = 0

    def _reduce(self, array, op_name: str, what: str) -> np.ndarray:
        a = np.ascontiguousarray(array)
        if a.dtype.kind == "f":
            a = a.astype(np.float64)
        elif a.dtype.kind in "iub":
            a = a.astype(np.int64)
        t = self._torch.from_numpy(a.copy()).to(self._device)
        try:
            self._dist.all_reduce(t, op=getattr(self._dist.ReduceOp, op_name))
        except Exception as exc:
            raise self._failure(what, exc) from exc
        self._sent += a.nbytes
        return t.cpu().numpy()

    def sum(self, array, op: str = "reduce sums") -> np.ndarray:
        return self._reduce(array, "SUM", op)

    def max(self, array, op: str = "reduce maxima") -> np.ndarray:
        return self._reduce(array, "MAX", op)

    def min(self, array, op: str = "reduce minima") -> np.ndarray:
        return self._reduce(array, "MIN", op)

    def gather_objects(self, obj, op: str = "gather objects") -> list:
        out = [None] * self.world
        try:
            self._dist.all_gather_object(out, obj)
        except Exception as exc:
            raise self._failure(op, exc) from exc
        return out

    def barrier(self, op: str = "barrier") -> None:
        try:
            self._dist.barrier()
        except Exception as exc:
            raise self._failure(op, exc) from exc

    def bytes_reduced(self) -> int:
        return self._sent

    def close(self) -> None:
        if self._owner and self._dist.is_initialized():
            self._dist.destroy_process_group()
            self._owner = False

    def _failure(self, what: str, exc: BaseException) -> DistributedError:
        return DistributedError(f"rank {self.rank} of {self.world}: '{what}' failed: another rank died or timed "
                                f"out ({_first_line(exc)}); the run is abandoned and nothing was published")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def init_comm(distributed: bool | None = None, *, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """The run's Comm: torch.distributed when asked (or, with `distributed=None`, when a launcher set its
    environment and more than one rank runs), the single-process identity otherwise."""
    if distributed is None:
        distributed = ranks_launched()
    if not distributed:
        return Comm()
    return TorchComm(device=device, timeout_s=timeout_s)


def test_hook(stage: str, comm: Comm) -> None:
    """Tests kill or stall a rank here: CFBD_FAST_TEST_DIE=STAGE:RANK makes that rank's process exit at once (a
    real process death, no clean-up), CFBD_FAST_TEST_STALL=STAGE:RANK makes it hang, so that the test sees how
    the others fail."""
    here = f"{stage}:{comm.rank}"
    if os.environ.get("CFBD_FAST_TEST_DIE") == here:
        os._exit(17)
    if os.environ.get("CFBD_FAST_TEST_STALL") == here:
        import time

        time.sleep(3600)
