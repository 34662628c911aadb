"""The trainer's compute: the LoRA model and its GRPO-family loss (``trainer.py``, ``grpo.py``),
DiLoCo's quantized outer step (``diloco.py``) and the trainers' all-reduce on hivemind
(``collective.py``, ``wire.py``, ``packing.py``).

It stays apart from ``node/roles/`` (where the trainer role, ``roles/trainer.py``, does the
network side) for two reasons: everything here is blocking torch work run in worker threads or
processes, with no p2p in it; and ``wire.py`` and the child side of ``collective.py`` import
hivemind, which must never load in a process that imports py-libp2p (the roles' process). One
package with that rule is easier to keep than a rule on some modules of ``roles/``.
"""
