"""Options shared by every command, defined once."""
from enum import Enum
from typing import Annotated

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
