"""The runtime: models, assembly, generation and the `PromptCache` engine (import-light: no torch here)."""

DEFAULT_MODEL = "smollm2-135m"  # the built-in model every command uses unless told otherwise
