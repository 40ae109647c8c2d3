"""The collectives behind a scan across processes and machines under torch.distributed (torchrun or any launcher
that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT): comm.py, the `Comm` (one process alone is a world of
one, every collective the identity); select.py, exact order statistics over ranks. The scan itself is
`pipeline.scan` with a `Comm`: each rank scans its rows, and the answer is the single process's."""
from .comm import Comm, DistributedError, init_comm, launched

__all__ = ["Comm", "DistributedError", "init_comm", "launched"]
