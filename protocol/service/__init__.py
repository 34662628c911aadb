"""Process plumbing every Bazaar service shares; none of it is how peers talk.

- ``config``: typed configs from TOML with dotted command-line overrides, ``data_dir``;
- ``database``: opening a process's database (SQLite WAL by default, PostgreSQL by URL);
- ``http``: an ASGI app served on trio beside the py-libp2p host;
- ``lifecycle``: run until a signal, then a bounded graceful shutdown;
- ``logs``: structured (JSON-lines) logging;
- ``api_errors``: OpenAI-shaped HTTP errors and request ids, shared by every HTTP API;
- ``openai_api``: the OpenAI request bodies the gateway and serving endpoints accept.

It may import the wire (``protocol``'s top level); the wire never imports it.
"""
