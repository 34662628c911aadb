"""How peers talk: typed messages, the msgpack codec, signed envelopes, identity, limits.

Wire modules (``codec``, ``envelope``, ``identity``, ``versions``, ``peer_limits`` and the
message families ``membership``, ``leases``, ``rollouts``, ``verification``, ``adapters``,
``runs``) import no networking library; ``p2p`` is the one transport module and the only
importer of py-libp2p in the project, ``gossip`` the gate every gossip frame passes, and
``payloads`` (over ``payload_store``) serves and fetches signed content by hash: rollout
payloads and adapter shards, which producers, verifiers, trainers and the coordinator all move.
Importing this package registers every message type with the codec.

Two subpackages hold what several processes share that is not the wire: ``service/`` (config,
HTTP on trio, lifecycle, logging, API errors, OpenAI request models) and ``accounts/`` (keys,
budgets, usage). The wire imports neither.
"""

from protocol import adapters, leases, membership, rollouts, runs, verification

__all__ = ["adapters", "leases", "membership", "rollouts", "runs", "verification"]
