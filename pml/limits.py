"""Size limits the PML parser enforces, in one place so that docs and error messages agree."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_PML_FILE_BYTES", "MAX_SRC_FILE_BYTES", "MAX_PARAMETER_LENGTH", "MAX_NESTING_DEPTH", "Limits", "current"]

# Read at call time (``pml.limits.NAME``), so a program or a test may lower or raise them by
# assigning the module attribute before parsing.

MAX_PML_FILE_BYTES = 16 * 1024 * 1024
"""Largest schema or prompt file ``parse_file`` reads (16 MiB). Big documents belong in ``src=`` files."""

MAX_SRC_FILE_BYTES = 16 * 1024 * 1024
"""Largest file one ``<module src="...">`` loads (16 MiB): ~4M tokens, beyond any model's context."""

MAX_PARAMETER_LENGTH = 65536
"""Largest ``length=`` of a ``<parameter>``, in tokens; larger slots are typos, not prompts."""

MAX_NESTING_DEPTH = 255
"""Deepest element nesting the XML library accepts without its unbounded ("huge") mode; fixed."""


@dataclass(frozen=True)
class Limits:
    """A snapshot of the limits, for printing them (``pml.limits.current()``)."""

    max_pml_file_bytes: int = MAX_PML_FILE_BYTES  # parse_file
    max_src_file_bytes: int = MAX_SRC_FILE_BYTES  # each src= file
    max_parameter_length: int = MAX_PARAMETER_LENGTH  # tokens per <parameter>
    max_nesting_depth: int = MAX_NESTING_DEPTH  # elements inside elements


def current() -> Limits:
    """The limits in force now (module attributes may have been reassigned)."""
    return Limits(MAX_PML_FILE_BYTES, MAX_SRC_FILE_BYTES, MAX_PARAMETER_LENGTH, MAX_NESTING_DEPTH)
