"""A throwaway PostgreSQL server for tests: its own cluster in a temp dir, on a free port.

Debian's PostgreSQL packages are on this kind of machine; the server refuses to run as root, so
it runs as the ``postgres`` user. Everything is removed when the context exits.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port


def _bin(name: str) -> str | None:
    versioned = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (versioned[-1] if versioned else None)


def unavailable_reason() -> str | None:
    if _bin("initdb") is None or _bin("pg_ctl") is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    if os.geteuid() != 0:
        return "starting a throwaway PostgreSQL as the postgres user needs root"
    try:
        subprocess.run(["id", "postgres"], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        return "there is no postgres user"
    return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields ``postgresql://postgres@127.0.0.1:PORT/postgres``."""
    base = Path(tempfile.mkdtemp(prefix="bazaar-pg-"))
    shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    port = free_port()

    pg_ctl, initdb = str(_bin("pg_ctl")), str(_bin("initdb"))

    def as_postgres(*cmd: str, check: bool = True) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=check, capture_output=True)

    try:
        as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "postgres")
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        as_postgres(pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(pg_ctl, "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def database(server_url: str, name: str) -> Iterator[str]:
    """A fresh database ``name`` on the server; yields its URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine(server_url.replace("postgresql://", "postgresql+psycopg://", 1),
                          isolation_level="AUTOCOMMIT")  # fmt: skip
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    yield server_url.rsplit("/", 1)[0] + f"/{name}"
