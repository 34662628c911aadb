"""The node process: identity and the p2p host at the top (``main.py``, the entry point of
``bazaar node start``; ``agent.py``, membership; ``config.py``), and beneath it, by concern:

- ``roles/``: what a joined node does (inference, verifier, serving, trainer), every role behind
  one interface (``roles/base.py``) that the agent runs;
- ``model/``: the model process (generation, completions and verification in a child process of
  its own) and its backends (PyTorch, vLLM), model loading, the tiny model, the machine probe;
- ``store/``: what a node keeps and serves to peers: rollout payloads, adapter versions and their
  shards, and the sync that keeps the adapter store at the versions the network works with;
- ``training/``: the trainer role's compute behind one ``Trainer`` object (build, round, recover,
  export: the LoRA model, loss, DiLoCo, the hivemind all-reduce), apart from ``roles/`` because
  part of it must never share a process with py-libp2p.
"""
