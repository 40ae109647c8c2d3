"""The `cfbd-fast` application: registers the command groups and maps known errors to one line."""
from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from typer.core import TyperGroup

from ..errors import CfbdError
from ._options import Json

# typer ships its own copy of click; its usage errors derive from this class (typer.BadParameter's base)
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def error_message(exc: BaseException) -> str:
    """One line for a known error: an OSError as 'PATH: reason', anything else by its first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, ClickException):
        return exc.format_message().splitlines()[0]
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class _Group(TyperGroup):
    """Turns cfbd-fast's own errors and I/O errors into `Error: <message>` on stderr and exit code 1; under
    --json, into `{"error": <message>}` on stdout with the same exit code (usage errors keep click's code 2).

    Set CFBD_FAST_DEBUG=1 to see the traceback instead.
    """

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (CfbdError, OSError, ClickException) as exc:
            if os.environ.get("CFBD_FAST_DEBUG"):
                raise
            as_json = ctx.meta.get("cfbd_fast_json", False)
            if isinstance(exc, ClickException) and not as_json:
                raise
            code = exc.exit_code if isinstance(exc, ClickException) else 1
            if as_json:
                typer.echo(json.dumps({"error": error_message(exc), "exit_code": code}))
            else:
                typer.echo(f"Error: {error_message(exc)}", err=True)
            raise typer.Exit(code) from exc


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Find backdoored image-caption pairs before you train a CLIP model (CFBD, coarse-to-fine).",
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"cfbd-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Find backdoored image-caption pairs before you train a CLIP model (CFBD, coarse-to-fine)."""


@app.command()
def env(json_out: Json = False) -> None:
    """Print OS, Python and library versions, and the devices found, for bug reports."""
    from ..provenance import device_name, versions

    lines = {**versions(), "cpu": device_name("cpu"), "cuda": device_name("cuda")}
    if json_out:
        typer.echo(json.dumps(lines, indent=2))
        return
    for key, value in lines.items():
        typer.echo(f"{key:10s} {value if value is not None else 'unavailable'}")


def _register() -> None:
    from . import demo as demo_cli
    from . import embed as embed_cli
    from . import filter as filter_cli
    from . import mapper as mapper_cli
    from . import poison as poison_cli
    from . import report as report_cli
    from . import scan as scan_cli
    from . import store as store_cli

    app.add_typer(store_cli.app, name="store", help="Create, import and inspect embedding stores.")
    app.command("train-mapper")(mapper_cli.train_mapper)
    app.command("scan")(scan_cli.scan)
    app.command("demo")(demo_cli.demo)
    app.command("embed")(embed_cli.embed)
    app.command("poison")(poison_cli.poison)
    app.command("report")(report_cli.report)
    app.command("explain")(report_cli.explain)
    app.command("filter")(filter_cli.filter_data)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
