"""The import rules of ARCHITECTURE.md, checked over every module (lazy imports included).

- packages import only the packages the architecture table allows;
- ``protocol/p2p.py`` is the only importer of py-libp2p, and ``protocol/`` imports no torch or
  hivemind; its wire modules import no networking library at all;
- no module imports both py-libp2p and hivemind (their protobuf modules clash in one process),
  and importing every libp2p-side module leaves hivemind unloaded.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

OURS = {"protocol", "envs", "verification", "coordinator", "node", "gateway", "bazaar"}
ALLOWED = {
    "protocol": set(),
    "envs": {"protocol"},
    "verification": {"protocol", "envs"},
    "coordinator": {"protocol", "envs", "verification"},
    "node": {"protocol", "envs", "verification"},
    "gateway": {"protocol"},
    "bazaar": OURS,
}
NETWORKING = {
    "libp2p", "multiaddr", "trio", "anyio", "socket", "asyncio", "httpx", "requests", "urllib",
    "hivemind", "grpc", "fastapi", "uvicorn", "hypercorn", "starlette", "http",
}  # fmt: skip
TRANSPORT = "protocol/p2p.py"
WIRE = {
    f"protocol/{m}.py"
    for m in (
        "__init__", "errors", "versions", "identity", "codec", "envelope", "membership",
        "leases", "rollouts", "verification", "adapters", "runs", "config", "observability",
    )
}  # fmt: skip
"""Modules that handle bytes and data only; the transport side (p2p, http, gossip, lifecycle)
may use networking libraries, and only p2p.py may use py-libp2p."""


def modules() -> list[Path]:
    return sorted(p for pkg in OURS for p in (REPO / pkg).rglob("*.py"))


def imported_tops(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays in its own package
                tops.add(path.relative_to(REPO).parts[0])
            elif node.module:
                tops.add(node.module.split(".")[0])
    return tops


def test_there_are_modules_to_check() -> None:
    assert len(modules()) > 10


def test_packages_import_only_what_the_architecture_allows() -> None:
    bad = []
    for path in modules():
        pkg = path.relative_to(REPO).parts[0]
        for top in imported_tops(path) & OURS - {pkg}:
            if top not in ALLOWED[pkg]:
                bad.append(f"{path.relative_to(REPO)} imports {top}")
    assert not bad, "\n".join(bad)


def test_only_the_transport_imports_libp2p() -> None:
    importers = {str(p.relative_to(REPO)) for p in modules() if "libp2p" in imported_tops(p)}
    assert importers == {TRANSPORT}


def test_protocol_imports_no_torch_or_hivemind_and_wire_modules_no_networking() -> None:
    for path in (REPO / "protocol").rglob("*.py"):
        tops = imported_tops(path)
        assert not tops & {"torch", "hivemind", "transformers", "peft"}, path
        if str(path.relative_to(REPO)) in WIRE:
            assert not tops & NETWORKING, f"{path} imports {tops & NETWORKING}"
    assert all((REPO / w).exists() for w in WIRE)


def test_no_module_imports_both_libp2p_and_hivemind() -> None:
    for path in modules():
        assert not {"libp2p", "hivemind"} <= imported_tops(path), path


def test_libp2p_side_never_loads_hivemind() -> None:
    """Import every module except hivemind's own workers in a fresh process: no hivemind."""
    hivemind_side = {p for p in modules() if "hivemind" in imported_tops(p)}
    names = [
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in modules()
        if p not in hivemind_side and p.name != "__main__.py"
    ]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "assert 'libp2p' in sys.modules\n"
        "assert 'hivemind' not in sys.modules, 'hivemind loaded on the libp2p side'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_each_package_imports_from_this_repo() -> None:
    for pkg in OURS:
        mod = importlib.import_module(pkg)
        assert mod.__file__ is not None
        assert Path(mod.__file__).resolve().is_relative_to(REPO), (pkg, mod.__file__)
