"""The node's model: a child process of its own (``worker.py``) that loads a base model into a
backend once and serves the roles' requests over a pipe, errors crossing it as types
(``errors.py``).

- ``worker.py``: the pipe, both ends (the node's ``ModelWorker``, the child's loop);
- ``errors.py``: what the child could not do, as the node catches it (``ContextTooLong``, ...);
- ``rollouts.py``: a lease into a rollout payload (the ``Producer`` the child runs);
- ``completions.py``: a serving request into ``n`` choices;
- ``backends/``: one interface, PyTorch (transformers + peft) and vLLM (CUDA);
- ``loading.py``, ``tiny.py``: resolving and loading a base model; the project-built tiny model;
- ``batching.py``: prompts into one left-padded batch;
- ``probe.py``: what this machine offers (devices, memory, backends), reported at join.
"""
