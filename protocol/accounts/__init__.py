"""Accounts: API keys (stored hashed), token budgets and their holds, usage records — the
database the gateway meters requests with and the coordinator bills runs against
(``store.py``). It may import the wire and ``protocol/service/``."""

from protocol.accounts.store import ApiKey, Bill, KeyStore, open_database

__all__ = ["ApiKey", "Bill", "KeyStore", "open_database"]
