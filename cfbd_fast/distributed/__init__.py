"""The scan across processes and machines under torch.distributed (torchrun or any launcher that sets RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT): each rank scans its rows, the global steps are collectives, and the
answer is the single process's. comm.py: the collectives; select.py: exact distributed order statistics;
gmm.py, threshold.py: the global fits and cuts; global_steps.py: the pipeline's global steps as collectives;
rows.py: one rank's rows; scan.py: the pipeline's stages over them; publish.py: the outputs."""
from .comm import Comm, DistributedError, init_comm, launched

__all__ = ["Comm", "DistributedError", "init_comm", "launched", "scan_sharded"]


def __getattr__(name: str):
    if name == "scan_sharded":
        from .scan import scan_sharded

        return scan_sharded
    raise AttributeError(f"module 'cfbd_fast.distributed' has no attribute {name!r}")
