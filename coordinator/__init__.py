"""The coordinator: membership, runs and their lifecycle, leases, audit assignment, ledger,
adapter version registry, REST API and database."""
