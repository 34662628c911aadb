"""What commands print through: the console, the one-line error a user can fix, and the
progress bar of building the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def build_tiny_model(target: Path, spec: Any) -> Path:
    """Build the tiny model (``node.model.tiny.TinySpec``) in ``target``, showing its warm-up
    training as a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from node.model.tiny import build_tiny_model as build

    columns = (
        TextColumn("building the tiny model"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("", total=spec.max_steps, info="")

        def report(step: int, loss: float, accuracy: float) -> None:
            info = f"step {step}  loss {loss:.3f}  accuracy {accuracy:.0%}"
            progress.update(task, completed=step, info=info)

        return build(target, spec, report)
