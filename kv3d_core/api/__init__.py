"""HTTP API layer: OpenAI-compatible endpoints, health and metrics."""
