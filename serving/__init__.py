"""`pml serve`: an OpenAI- and Anthropic-compatible HTTP server over the prompt cache (see docs/SERVING.md)."""
