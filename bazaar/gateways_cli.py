"""``bazaar gateway admit | revoke | list``: which gateways the coordinator admits to the serving
nodes (``coordinator/gateways.py``). Like ``bazaar keys`` on the accounts database, these write
the coordinator's database directly: whoever can open it administers the network."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from bazaar.output import console, err_console
from bazaar.output import fail as _fail

CoordinatorDbOpt = Annotated[
    str | None,
    typer.Option("--db", help="The coordinator's database URL (default: SQLite in the data dir)."),
]


def _gateway_store(db: str | None) -> Any:
    from coordinator.db import default_url, open_database
    from coordinator.gateways import GatewayStore
    from protocol.service.config import data_dir

    return GatewayStore(open_database(db or default_url(data_dir())))


def gateway_admit(
    name: Annotated[str, typer.Argument(help="A unique name for the gateway.")],
    replace: Annotated[
        bool, typer.Option("--replace", help="Give an admitted gateway a new secret.")
    ] = False,
    db: CoordinatorDbOpt = None,
) -> None:
    """Admit a gateway to the serving nodes (on the coordinator's machine, or with its --db):
    the secret is printed once and stored only as a hash. The gateway reads it from
    BAZAAR_GATEWAY_SECRET or --secret_file."""
    try:
        secret, _ = _gateway_store(db).admit(name, replace)
    except ValueError as e:
        raise _fail(str(e)) from None
    print(secret)  # alone on stdout, so SECRET=$(bazaar gateway admit NAME) works
    err_console.print(f"[dim]gateway {name!r} admitted; the secret is not shown again[/]",
                      highlight=False)  # fmt: skip


def gateway_revoke(
    name: Annotated[str, typer.Argument(help="The gateway's name.")], db: CoordinatorDbOpt = None
) -> None:
    """Revoke a gateway: the coordinator gives it no more routes or serving tokens, and nodes
    refuse it once the tokens it holds expire (serving_token_ttl_s, 5 minutes by default)."""
    if not _gateway_store(db).revoke(name):
        raise _fail(f"no admitted gateway named {name!r}")
    console.print(f"gateway {name!r} revoked", highlight=False)


def gateway_list(
    db: CoordinatorDbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List admitted and revoked gateways (never their secrets)."""
    rows = [{"name": g.name, "admitted_at": g.admitted_at, "revoked_at": g.revoked_at}
            for g in _gateway_store(db).all()]  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    import time

    from rich.table import Table

    table = Table(title=f"{len(rows)} gateways")
    for col in ("name", "admitted", "state"):
        table.add_column(col)
    for g in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g["admitted_at"]))
        table.add_row(g["name"], when, "[red]revoked[/]" if g["revoked_at"] else "admitted")
    console.print(table)
