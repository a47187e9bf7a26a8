"""Attention store: encode prompt modules once, keep their KV attention states, reuse them.

Import-light on purpose: importing this package does not import torch or transformers, so the
`pml` command line starts fast. Import the submodules (`prompt_cache.models`,
`attention_store.store`, ...) for the actual API.
"""
