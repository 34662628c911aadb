"""How peers talk: typed messages, the msgpack codec, signed envelopes, identity, config.

Wire modules (``codec``, ``envelope``, ``identity``, ``versions`` and the message families
``membership``, ``leases``, ``rollouts``, ``verification``, ``adapters``, ``runs``) import no
networking library; ``p2p`` is the one transport module and the only importer of py-libp2p in the
project. Importing this package registers every message type with the codec.
"""

from protocol import adapters, leases, membership, rollouts, runs, verification

__all__ = ["adapters", "leases", "membership", "rollouts", "runs", "verification"]
