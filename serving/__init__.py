"""`pml serve`: an OpenAI- and Anthropic-compatible HTTP server over the prompt cache (see docs/SERVING.md)."""

DEFAULT_MAX_BATCH = 8  # PML requests answered in one packed batch at most (`pml serve --max-batch`)
