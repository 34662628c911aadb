"""The gateway: OpenAI-compatible API, API keys, metering, budgets, rate limits and routing."""
