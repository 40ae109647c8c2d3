"""Runs several `cfbd-fast` commands one after the other in one process, or in every rank of one torchrun launch
(the process group is joined once and each command's Comm joins it), so that a test starts Python, torch and the
group once for several checks: `python tests/cli_commands.py '[["scan", ...], ["embed", ...]]'`."""
from __future__ import annotations

import json
import sys


def main() -> int:
    import torch.distributed as dist

    from cfbd_fast.cli.main import app
    from cfbd_fast.distributed.comm import launched

    if launched():
        dist.init_process_group("gloo")
    try:
        for args in json.loads(sys.argv[1]):
            code = app(args, standalone_mode=False, prog_name="cfbd-fast")
            if code:
                return int(code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
