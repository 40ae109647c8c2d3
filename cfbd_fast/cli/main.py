"""The `cfbd-fast` application: registers the command groups and maps known errors to one line."""
from __future__ import annotations

import os
import platform

import typer
from typer.core import TyperGroup

from ..errors import CfbdError


class _Group(TyperGroup):
    """Turns cfbd-fast's own errors and I/O errors into `Error: <message>` on stderr and exit code 1.

    Set CFBD_FAST_DEBUG=1 to see the traceback instead.
    """

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (CfbdError, OSError) as exc:
            if os.environ.get("CFBD_FAST_DEBUG"):
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            typer.echo(f"Error: {message}", err=True)
            raise typer.Exit(1) from exc


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Find backdoored image-caption pairs before you train a CLIP model (CFBD, coarse-to-fine).",
)


@app.command()
def env() -> None:
    """Print OS, Python and library versions, and the devices found, for bug reports."""
    from .. import __version__

    lines = {"cfbd-fast": __version__, "os": platform.platform(), "python": platform.python_version()}
    for mod in ("numpy", "torch", "triton", "numba", "sklearn", "pyarrow", "open_clip"):
        try:
            lines[mod] = __import__(mod).__version__
        except Exception as exc:  # report, never fail: this is a diagnostic
            lines[mod] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        lines["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except Exception as exc:
        lines["cuda"] = f"unavailable ({type(exc).__name__})"
    for key, value in lines.items():
        typer.echo(f"{key:10s} {value}")


def _register() -> None:
    from . import demo as demo_cli
    from . import mapper as mapper_cli
    from . import scan as scan_cli
    from . import store as store_cli

    app.add_typer(store_cli.app, name="store", help="Create, import and inspect embedding stores.")
    app.command("train-mapper")(mapper_cli.train_mapper)
    app.command("scan")(scan_cli.scan)
    app.command("demo")(demo_cli.demo)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
