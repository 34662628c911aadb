"""The ``bazaar`` command line: one thin entry point that dispatches to each process role.

It may import every package (like ``scripts/``), but imports each lazily inside the command that
needs it, so ``bazaar --help`` stays instant and a process only loads what its role uses.
"""

from protocol.versions import SOFTWARE_VERSION as __version__

__all__ = ["__version__"]
