"""``bazaar`` command groups. Each command parses its options, imports what it needs, runs.

Errors a user can fix (a bad config, an unusable key file) print one clear line and exit 2.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from bazaar import __version__

app = typer.Typer(
    help="Bazaar: reinforcement-learning post-training on a peer-to-peer GPU network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
identity_app = typer.Typer(help="This machine's node identity (Ed25519 key and peer id).")
app.add_typer(identity_app, name="identity")

console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        console.print(f"bazaar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    pass


@identity_app.command("show")
def identity_show(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Print this node's peer id, creating the key on first use."""
    from protocol.config import data_dir
    from protocol.errors import IdentityError
    from protocol.identity import KEY_FILE_NAME, load_or_create_identity

    path = data_dir() / KEY_FILE_NAME
    try:
        ident, created = load_or_create_identity(path)
    except IdentityError as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps({"peer_id": ident.peer_id, "key_file": str(path), "created": created}))
        return
    if created:
        console.print(f"created a new identity in {path}")
    console.print(f"peer id:  [bold]{ident.peer_id}[/]", highlight=False)
    console.print(f"key file: {path}", highlight=False)


def main() -> None:
    app()
