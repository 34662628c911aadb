"""Test hosts in Linux network namespaces, joined by veth pairs to a bridge in a hub namespace.

All traffic stays inside the namespaces this module creates (addresses 10.77.0.0/24 exist only
there); everything is removed on exit. Needs root and iproute2.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.77.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (the `ip` command) is not installed"
    probe = f"bzprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except subprocess.CalledProcessError as e:
        return f"`ip netns add` failed: {e.stderr.decode().strip()}"
    return None


@dataclass
class Host:
    ns: str
    address: str
    link: str
    """The veth end on the bridge; down cuts this host off."""
    hub: str

    def cut(self) -> None:
        _ip("-n", self.hub, "link", "set", self.link, "down")

    def restore(self) -> None:
        _ip("-n", self.hub, "link", "set", self.link, "up")


@contextmanager
def network(names: list[str]) -> Iterator[dict[str, Host]]:
    tag = f"bz{os.getpid() % 100000}"
    hub = f"{tag}hub"
    made: list[str] = []
    try:
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        hosts = {}
        for i, name in enumerate(names, start=1):
            ns, inner, outer = f"{tag}{name}", f"{tag}i{i}", f"{tag}o{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", hub, "link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("-n", hub, "link", "set", inner, "netns", ns)
            _ip("-n", hub, "link", "set", outer, "master", "br0")
            _ip("-n", hub, "link", "set", outer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            hosts[name] = Host(ns, f"{SUBNET}.{i}", outer, hub)
        yield hosts
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


_CLONE_NEWNET = 0x40000000


@contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the calling thread inside namespace ``ns`` (sockets it opens live there), then bring
    it back: how a test reaches a REST API that listens only inside a namespace."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setns(fd: int) -> None:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")

    with open("/proc/thread-self/ns/net") as home, open(f"/var/run/netns/{ns}") as target:
        setns(target.fileno())
        try:
            yield
        finally:
            setns(home.fileno())
