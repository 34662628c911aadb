"""What a node keeps on disk and serves to peers, each content checked on the way in.

- ``payload_store.py``: content-addressed files (rollout payloads, adapter shards);
- ``payloads.py``: rollout payloads served and fetched over py-libp2p (hash and signer checked);
- ``adapters.py``: adapter versions in PEFT format, their model names, cut into shards;
- ``shards.py``: a version's shards fetched swarm style, and served onward;
- ``versions.py``: ``VersionSync``, one per node, keeping the adapter store at the versions its
  roles work with.
"""
