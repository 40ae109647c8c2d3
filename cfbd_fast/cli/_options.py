"""Options shared by every command, defined once."""
from enum import Enum
from typing import Annotated

import typer

from ..pipeline.options import DEVICES


def _remember_json(ctx: typer.Context, value: bool) -> bool:
    """Marks the invocation as JSON-speaking, so that errors are printed as JSON too (see main.py)."""
    if value:
        ctx.meta["cfbd_fast_json"] = True
    return value


Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars on stderr.")]
Json = Annotated[bool, typer.Option("--json", is_eager=True, callback=_remember_json,
                                    help="Print machine-readable JSON on stdout (errors too).")]
Device = Enum("Device", {name: name for name in DEVICES}, type=str)
