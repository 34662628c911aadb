"""Rollout checks by recomputation, the audit sampling policy, reputation and penalties."""
