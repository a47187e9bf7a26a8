"""Request bodies of the OpenAI and Anthropic APIs (the fields this server reads), as pydantic models.

Unknown fields are accepted and ignored (`extra="allow"`), as the providers' clients send more
than a small server implements; fields this server reads are validated, and a wrong one is a 400
in the provider's error shape.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- OpenAI --------------------------------------------------------------------------------------
class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    cache_salt: str | None = Field(None, max_length=256)  # vLLM's extension: tenant isolation


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] | None = None
    pml: str | None = None  # extension: a PML <prompt> against a registered schema, instead of messages
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for /v1/completions


# -- Anthropic -----------------------------------------------------------------------------------
class CacheControl(_Body):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] = "5m"


class TextBlock(_Body):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: Union[str, list[TextBlock]]


class MessagesRequest(_Body):
    model: str
    max_tokens: int = Field(ge=0)
    messages: list[AnthropicMessage]
    system: Union[str, list[TextBlock], None] = None
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    cache_salt: str | None = Field(None, max_length=256)  # extension, as on the OpenAI endpoints
    cache_control: CacheControl | None = None  # top level: a breakpoint after the last message


# -- schemas -------------------------------------------------------------------------------------
class SchemaUpload(_Body):
    pml: str  # the PML <schema> text
    pin: bool = False  # keep its module states in the memory tier whatever the LRU order
