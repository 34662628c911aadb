"""A node's roles: what it does once it has joined, each behind the one ``Role`` interface
(``base.py``) that the membership agent runs as a task.

- ``inference.py``: leases in, rollout payloads kept and receipts out;
- ``verifier.py``: audits in, payloads fetched and rechecked, verdicts out;
- ``serving.py``: the OpenAI-compatible endpoint the gateway routes to;
- ``trainer.py``: training rounds in, new adapter versions published.

The roles do the network side (requests to the coordinator, fetches from peers); the work itself
runs in the model process (``node/model/``) or, for the trainer, in ``node/training/``.
"""
