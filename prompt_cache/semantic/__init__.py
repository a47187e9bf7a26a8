"""Semantic response cache (L1): answer a question close enough to one already answered in the same context."""

from prompt_cache.semantic.cache import (DEFAULT_THRESHOLD, CacheStats, ContextKey, CosineThreshold, Hit,
                                         SemanticCache, SemanticCacheConfig, context_key, normalize_question)

__all__ = ["DEFAULT_THRESHOLD", "CacheStats", "ContextKey", "CosineThreshold", "Hit", "SemanticCache",
           "SemanticCacheConfig", "context_key", "normalize_question"]
