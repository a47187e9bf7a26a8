"""PML, the Prompt Markup Language: parse schemas and prompts, lay them out in token positions."""

from pml.errors import PMLError
from pml.layout import Layout, ModuleLayout, PlainChat, Segment, Tokenizer, compute_layout
from pml.model import Chat, Module, ModuleRef, Parameter, Prompt, Schema, Text, Union
from pml.parser import parse_file, parse_prompt, parse_schema
from pml.prompt import BoundPrompt, bind_prompt

__all__ = [
    "PMLError",
    "Schema", "Prompt", "Module", "Union", "Parameter", "Chat", "Text", "ModuleRef",
    "parse_schema", "parse_prompt", "parse_file",
    "Tokenizer", "PlainChat", "Segment", "ModuleLayout", "Layout", "compute_layout",
    "BoundPrompt", "bind_prompt",
]
