"""`tunesmith serve`: an OpenAI-compatible HTTP API over a model, with batched generation."""
