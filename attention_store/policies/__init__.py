"""Encoding policies, by name: `independent` (default), `independent:nosink`, `schema`, and the
recovery policies `blend:R` and `link:K`, which store like `independent` and act at assembly (see base.py).

Importing this package registers the built-in policies; it imports numpy, not torch.
"""

from attention_store.policies import blend, independent, link, schema  # noqa: F401  (registration)
from attention_store.policies.base import (ROOT, EncodingPolicy, Group, RecomputeContext, get_policy, policy_names,
                                           register, unregister)

DEFAULT_POLICY = "independent"
# Specs the command line offers by name (any registered `name[:arg]` is accepted).
BUILTIN_SPECS = ("independent", "independent:nosink", "schema", "blend:R", "link:K")

__all__ = ["ROOT", "DEFAULT_POLICY", "BUILTIN_SPECS", "EncodingPolicy", "Group", "RecomputeContext", "get_policy", "policy_names",
           "register", "unregister"]
