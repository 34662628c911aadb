"""The node process: identity, p2p host, roles (inference, trainer, verifier), model backends,
rollout store, adapter shards and the serving endpoint."""
