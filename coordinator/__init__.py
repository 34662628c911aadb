"""The coordinator process, one module per concern.

- ``server.py``: the py-libp2p host; every request dispatched by message type to its handler;
- ``members.py``: the membership protocol and topic (joins, peers, goodbyes, heartbeats), over
  the node table (``membership.py``); ``admission.py``: who may join or take leases how fast;
- the protocols' handlers, over one shared state: ``rollouts.py`` (leases, receipts, expiry),
  ``rounds.py`` (training assignments, manifests, reports, adapter versions), ``auditing.py``
  (audits, verdicts, penalties), ``lifecycle.py`` (runs created, queued, finished, deployed);
- ``state.py``: that state — the books (``leases.py``, ``audits.py``, ``reports.py``,
  ``billing.py``) and one database session; ``db.py`` defines each stored entity once;
- ``runs.py``: a run spec (``protocol/runs.py``) planned against the environment registry;
- ``api.py``, ``views.py``, ``dashboard.html``: the REST API, reading through query functions;
- ``hivemind_dht.py``: the trainers' DHT bootstrap (its own process).
"""
