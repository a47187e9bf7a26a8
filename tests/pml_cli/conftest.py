"""Shared CLI fixtures: a small schema with a parameter, and a prompt that fills it."""

import pytest

SCHEMA = """<schema name="notes">
  Notes.
  <module name="a">First note about rivers and lakes.</module>
  <module name="b">Second note about <parameter name="thing" length="8" scaffold="hills"/>.</module>
</schema>"""
PROMPT = '<prompt schema="notes"><a/><b thing="peaks"/>What do the notes say?</prompt>'


@pytest.fixture
def files(tmp_path):
    """A folder with `s.pml` (the schema) and `p.pml` (the prompt)."""
    (tmp_path / "s.pml").write_text(SCHEMA)
    (tmp_path / "p.pml").write_text(PROMPT)
    return tmp_path
