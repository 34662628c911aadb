"""What every benchmark shares: the machine it ran on, and writing its flat JSON result."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count() or 0,
        "torch_version": str(torch.__version__),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def write_result(out: Path, result: dict[str, Any]) -> None:
    """Write ``result`` plus the machine description to ``out`` (bench-results/<name>.json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, **machine()}, indent=2) + "\n")
    print(f"wrote {out}")
