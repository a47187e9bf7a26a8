"""The one exception type of the PML package, formatted like a compiler diagnostic."""

from __future__ import annotations

__all__ = ["PMLError"]


class PMLError(Exception):
    """A problem with a PML schema or prompt.

    ``str(e)`` reads ``FILE:LINE: error: <element>: MESSAGE``; parts that are unknown are left
    out, so an error with no file, line or element is just ``error: MESSAGE``. The attributes keep
    the parts for callers that want them (``file`` is a string path, ``line`` a 1-based int,
    ``element`` the tag name without brackets).
    """

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        element: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.element = element

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + ":"
            if self.line is not None:
                where += f"{self.line}:"
            where += " "
        elif self.line is not None:
            where = f"{self.line}: "
        element = f"<{self.element}>: " if self.element else ""
        return f"{where}error: {element}{self.message}"

    def with_file(self, file: str | None) -> PMLError:
        """Return this error, naming ``file`` if it does not name one yet."""
        if self.file is None and file is not None:
            self.file = str(file)
        return self
