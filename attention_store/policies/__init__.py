"""Encoding policies: what a cached unit attends to when it is encoded (placeholder, being built)."""

POLICIES = ("independent", "schema")
DEFAULT_POLICY = "independent"
