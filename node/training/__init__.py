"""The trainer's compute, behind one object: ``Trainer`` (``trainer.py``) builds a run's trainer,
trains a round, recovers a published version and exports the adapter. Beneath it: the LoRA
model (``lora.py``), rollouts into training completions (``examples.py``), the GRPO-family loss
(``grpo.py``), DiLoCo's quantized outer step (``diloco.py``), and the trainers' all-reduce on
hivemind (``collective.py``, its wire ``wire.py`` and ``packing.py``).

It stays apart from ``node/roles/`` (where the trainer role, ``roles/trainer.py``, does the
network side of a round and calls the ``Trainer``) for two reasons: everything here is blocking
torch work run in worker threads or processes, with no p2p in it; and ``wire.py`` and the child
side of ``collective.py`` import hivemind, which must never load in a process that imports
py-libp2p (the roles' process). One package with that rule is easier to keep than a rule on
some modules of ``roles/``.
"""
