"""Environments: task datasets, harnesses and reward rubrics, a registry, built-in offline
environments and adapters for third-party task libraries."""
