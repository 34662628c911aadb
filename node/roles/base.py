"""The one interface every role of a node implements: what the membership agent runs.

``node/main.py`` builds the node's roles from its config before the node joins (they share one
model process and one ``VersionSync``); once the node has joined, the agent (``NodeAgent.run``)
starts each role's ``run(agent)`` as a task beside its own loops, and cancels them all when the
node stops. A role reaches the coordinator through ``agent.ask`` and peers through
``agent.host``; it works until it is cancelled, cleaning up in ``finally`` (bounded: the node's
goodbye waits on it). A role that cannot work at all (its model cannot load) logs why and
returns, and the node stays up for its other roles.

>>> import trio
>>> class Idle(Role):
...     name = "idle"
...     async def run(self, agent: NodeAgent) -> None:
...         await trio.sleep(0)
>>> Idle().name
'idle'
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from node.agent import NodeAgent


class Role(abc.ABC):
    name: ClassVar[str]
    """The role's name as ``--roles`` spells it (``serving`` for ``--serve``); its task's name."""
    follows_versions: ClassVar[bool] = True
    """Whether the role wants new adapter versions as they are made (manifests on gossip); a
    node whose roles all fetch versions on demand does not subscribe to them, nor relay them."""

    @abc.abstractmethod
    async def run(self, agent: NodeAgent) -> None:
        """Do the role's work on the joined node ``agent`` until cancelled; return early only
        if the role cannot work at all (logged)."""
