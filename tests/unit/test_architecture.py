"""The import rules of ARCHITECTURE.md, checked over every module (lazy imports included).

- packages import only the packages the architecture table allows, subpackages included:
  ``protocol``'s top level (the wire) imports none of ``protocol/service/`` or
  ``protocol/accounts/``; ``service`` imports the wire; ``accounts`` the wire and ``service``;
  in ``node/``, the roles use the model process, the stores and the trainer, never the reverse;
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
NODE_PARTS = {"node.roles", "node.model", "node.store", "node.training"}
SUBPACKAGES = {"protocol.service", "protocol.accounts", *NODE_PARTS}
"""Packages inside a package that have rules of their own (a module's unit is the deepest of
these, or of ``OURS``, that contains it)."""
OUTSIDE_NODE = {"protocol", "envs", "verification"}
ALLOWED = {
    "protocol": set(),
    "protocol.service": {"protocol"},
    "protocol.accounts": {"protocol", "protocol.service"},
    "envs": {"protocol"},
    "verification": {"protocol", "envs"},
    "coordinator": {"protocol", "envs", "verification"},
    # the node process's top (entry point, agent, config) runs the roles; a role uses the
    # model process, the stores and the trainer; the trainer reads adapters from the store;
    # the model process and the stores stand alone
    "node": OUTSIDE_NODE | NODE_PARTS,
    "node.roles": OUTSIDE_NODE | {"node", "node.model", "node.store", "node.training"},
    "node.training": OUTSIDE_NODE | {"node.store"},
    "node.model": OUTSIDE_NODE,
    "node.store": OUTSIDE_NODE,
    "gateway": {"protocol"},
    "bazaar": OURS | SUBPACKAGES,
}
for _unit, _allowed in list(ALLOWED.items()):
    if not _unit.startswith("protocol") and "protocol" in _allowed:  # the package, whole
        ALLOWED[_unit] = _allowed | {"protocol.service", "protocol.accounts"}
NETWORKING = {
    "libp2p", "multiaddr", "trio", "anyio", "socket", "asyncio", "httpx", "requests", "urllib",
    "hivemind", "grpc", "fastapi", "uvicorn", "hypercorn", "starlette", "http",
}  # fmt: skip
TRANSPORT = "protocol/p2p.py"
WIRE = {
    f"protocol/{m}.py"
    for m in (
        "__init__", "errors", "versions", "identity", "codec", "envelope", "membership",
        "leases", "rollouts", "verification", "adapters", "runs", "peer_limits",
        "serving_tokens",
    )
}  # fmt: skip
"""Modules that handle bytes and data only; the transport (p2p, gossip) may use networking
libraries, and only p2p.py may use py-libp2p."""


def modules() -> list[Path]:
    return sorted(p for pkg in OURS for p in (REPO / pkg).rglob("*.py"))


def imported_names(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).parent.parts)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
                # ``from protocol import service`` imports the subpackage
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def imported_tops(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_names(path)}


def unit_of(dotted: str) -> str | None:
    """The package whose rules apply to ``dotted``: the deepest rule-holding one around it."""
    for unit in sorted(SUBPACKAGES | OURS, key=len, reverse=True):
        if dotted == unit or dotted.startswith(unit + "."):
            return unit
    return None


def test_there_are_modules_to_check() -> None:
    assert len(modules()) > 10


def test_packages_import_only_what_the_architecture_allows() -> None:
    bad = []
    for path in modules():
        own = unit_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        assert own is not None
        for name in imported_names(path):
            other = unit_of(name)
            if other is None or other == own:
                continue
            # a package may use itself and what it is allowed; a unit inside a package it may
            # use (``protocol.accounts`` inside ``protocol``) is not thereby allowed
            if other not in ALLOWED[own]:
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_rules_catch_a_wire_module_importing_service_plumbing(tmp_path: Path) -> None:
    probe = REPO / "protocol" / "_probe_rule.py"
    probe.write_text("from protocol.service.config import ConfigModel\n")
    try:
        names = imported_names(probe)
        own = unit_of("protocol._probe_rule")
        assert own == "protocol"
        assert any(unit_of(n) == "protocol.service" for n in names)
        assert "protocol.service" not in ALLOWED[own]
    finally:
        probe.unlink()


def test_only_the_transport_imports_libp2p() -> None:
    importers = {str(p.relative_to(REPO)) for p in modules() if "libp2p" in imported_tops(p)}
    assert importers == {TRANSPORT}


def test_protocol_imports_no_torch_or_hivemind_and_wire_modules_no_networking() -> None:
    for path in (REPO / "protocol").rglob("*.py"):
        tops = imported_tops(path)
        assert not tops & {"torch", "hivemind", "transformers", "peft"}, path
        if path.parent == REPO / "protocol":  # the wire and the transport: no web, no database
            assert not tops & {"fastapi", "sqlalchemy", "hypercorn", "starlette"}, path
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
