"""Protocol ids and versions.

Every stream protocol and gossip topic is named ``/bazaar/<name>/<major>.<minor>.<patch>``. Peers
that share a major version interoperate; a different major is refused with a message that names
both versions, so an operator knows which side to upgrade.

>>> protocol_id("membership")
'/bazaar/membership/1.0.0'
>>> check_compatible("/bazaar/membership/1.2.0", "/bazaar/membership/1.0.0")
>>> check_version("2.0.0", "1.3.0")
Traceback (most recent call last):
...
protocol.errors.VersionMismatch: peer speaks protocol 2.0.0 (major 2), we speak 1.3.0 (major 1)
"""

from __future__ import annotations

import importlib.metadata
import re

from protocol.errors import DecodeError, VersionMismatch

PROTOCOL_VERSION = "1.0.0"
"""The wire version this code speaks; carried in every envelope and every protocol id."""

try:
    SOFTWARE_VERSION = importlib.metadata.version("bazaar")
    """The installed release of this software (distinct from the wire version)."""
except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not installed
    SOFTWARE_VERSION = "0.0.0+checkout"

_ID = re.compile(r"^/bazaar/([a-z][a-z0-9-]*)/(\d+)\.(\d+)\.(\d+)$")


def protocol_id(name: str, version: str = PROTOCOL_VERSION) -> str:
    """The versioned id of a stream protocol or gossip topic."""
    pid = f"/bazaar/{name}/{version}"
    if not _ID.match(pid):
        raise ValueError(f"bad protocol id {pid!r}: names are lowercase words, versions X.Y.Z")
    return pid


def parse_protocol_id(pid: str) -> tuple[str, tuple[int, int, int]]:
    """Split ``/bazaar/<name>/<x.y.z>`` into its name and version numbers."""
    m = _ID.match(pid)
    if not m:
        raise DecodeError(f"not a bazaar protocol id: {pid!r}")
    return m.group(1), (int(m.group(2)), int(m.group(3)), int(m.group(4)))


def major(version: str) -> int:
    """The major number of an ``x.y.z`` version string."""
    head = version.split(".", 1)[0]
    if not head.isdigit():
        raise DecodeError(f"not a version: {version!r}")
    return int(head)


def check_version(theirs: str, ours: str = PROTOCOL_VERSION, what: str = "protocol") -> None:
    """Refuse a peer whose ``x.y.z`` version has another major than ours."""
    if major(theirs) != major(ours):
        raise VersionMismatch(
            f"peer speaks {what} {theirs} (major {major(theirs)}), "
            f"we speak {ours} (major {major(ours)})"
        )


def check_compatible(theirs: str, ours: str) -> None:
    """Refuse a peer's protocol id whose name or major version differs from ours."""
    their_name, their_v = parse_protocol_id(theirs)
    our_name, our_v = parse_protocol_id(ours)
    if their_name != our_name:
        raise DecodeError(f"protocol {theirs} is not {ours}")
    if their_v[0] != our_v[0]:
        raise VersionMismatch(
            f"peer speaks {theirs} (major {their_v[0]}), we speak {ours} (major {our_v[0]})"
        )


# Every protocol and topic, declared once; processes and tests import these.
MEMBERSHIP = protocol_id("membership")
"""Requests: join, peers, goodbye (coordinator). Topic: heartbeats, announces, goodbyes."""
LEASES = protocol_id("leases")
"""Requests: lease, rollout receipt (coordinator)."""
AUDITS = protocol_id("audits")
"""Requests: audit assignment, verdict (coordinator)."""
ADAPTERS = protocol_id("adapters")
"""Requests: training round, manifest, round report, versions (coordinator). Topic: manifests
and deployments."""
PAYLOAD = protocol_id("payload")
"""Requests: a rollout payload by hash (any node that produced one)."""
SHARDS = protocol_id("shards")
"""Requests: an adapter shard by hash (any node holding it)."""
