"""Request and response models of the HTTP API: OpenAI's shapes, vLLM's extensions.

Request models check ranges and types (a failure is a 400 in OpenAI's error
shape, see api.py); they ignore fields they do not know, as vLLM does, but
refuse the known OpenAI fields we do not implement when they ask for
something (best_of > n, penalties, logit_bias), rather than
silently serving a different request.
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from loramux.adapters_store.arithmetic import MAX_ADAPTER_WEIGHT
from loramux.server.engine.sampling import MAX_STOP_STRINGS

MAX_N = 8  # completions per request
MAX_LOGPROBS = 20
MAX_MIX = 16  # adapters in one per-request mix or merge
MAX_STOP_TOKEN_IDS = 256
INT64 = (-(2**63), 2**63 - 1)
# Every float a request carries must be finite: NaN and inf (which Python's
# JSON reader accepts) are a 400 naming the field, never a value the engine sees.
_STRICT = ConfigDict(extra="ignore", allow_inf_nan=False)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

def _field_error(field: str, value, message: str) -> ValidationError:
    """A model validator's refusal that names `field` (the 400's param), where a
    check needs two fields and a ValueError would name the body."""
    return ValidationError.from_exception_data("request", [InitErrorDetails(
        type=PydanticCustomError("value_error", message), loc=(field,), input=value)])


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------------
# shared request fields
# ---------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class AdapterWeight(BaseModel):
    """One adapter of a per-request mix (loramux extension)."""

    model_config = _STRICT

    name: str
    weight: float = Field(1.0, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT)


MAX_CHOICES = 4096  # strings in a `choice` constraint


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")  # `schema` shadows a BaseModel method
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs `json_schema`")
        return self


def _schema_object(v):
    """A JSON schema given as an object or as JSON text -> the object."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ValueError("the JSON schema is not valid JSON") from None
    if not isinstance(v, dict):
        raise ValueError("the JSON schema must be a JSON object")
    return v


def _choices(v):
    if v is not None and not 1 <= len(v) <= MAX_CHOICES:
        raise ValueError(f"a choice needs 1 to {MAX_CHOICES} strings")
    return v


# The constraint fields structured_outputs and the guided_* fields share; the
# check sits outside the union, so an error names the field itself
SchemaField = Annotated[Any, AfterValidator(lambda v: None if v is None else _schema_object(v))]
ChoiceField = Annotated[list[str] | None, AfterValidator(_choices)]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    model_config = _STRICT

    json_: SchemaField = Field(None, alias="json")  # a schema object, or its JSON text
    regex: str | None = None
    choice: ChoiceField = None
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object")
        return self


class _SamplingFields(BaseModel):
    """Fields completions and chat share (OpenAI's names and defaults)."""

    model_config = _STRICT

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=INT64[1])
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)  # range: Engine.check_request
    # each prompt token's logprob and rank plus this many alternatives (vLLM's
    # field; its -1, the whole vocabulary, is refused)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # loramux extension: serve this request with Σ weight_i · ΔW_i of these
    # adapters (ranks concatenated); `model` then names the base model
    adapters: list[AdapterWeight] | None = Field(None, min_length=1, max_length=MAX_MIX)
    # structured outputs (server/api/structured.py): OpenAI's response_format,
    # vLLM's structured_outputs, and vLLM's older guided_* fields; one at most
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: SchemaField = None
    guided_regex: str | None = None
    guided_choice: ChoiceField = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [k for k in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, k) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"send at most one output constraint; got {', '.join(given)}")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self):
        if self.stream and self.prompt_logprobs:  # as vLLM: 0 is allowed and streams nothing extra
            raise ValueError("prompt_logprobs are not available when stream is true")
        return self

    def prompt_logprobs_wanted(self) -> int | None:
        """The engine's SamplingParams.prompt_logprobs for this body."""
        return self.prompt_logprobs


# ---------------------------------------------------------------------------
# /v1/completions
# ---------------------------------------------------------------------------

TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo, which then returns just the prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        if v == "" or (isinstance(v, list) and any(p == "" for p in v)):
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _completion_only(self):
        if self.max_tokens == 0 and not self.echo:
            raise _field_error("max_tokens", 0, "max_tokens must be at least 1 (0 only with echo)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only equal to n)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def prompt_logprobs_wanted(self) -> int | None:
        # echo with logprobs reports the prompt's logprobs too (vLLM, OpenAI's legacy API)
        return self.logprobs if self.prompt_logprobs is None and self.echo else self.prompt_logprobs

    def engine_max_tokens(self) -> int | None:
        """max_tokens for the engine: echo with max_tokens 0 generates one token
        nobody sees (vLLM does the same), since a prompt's logprobs come from its prefill."""
        return 1 if self.max_tokens == 0 else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (each text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class RankedLogprob(BaseModel):
    """vLLM's Logprob: one token of a prompt_logprobs position."""

    logprob: float
    rank: int | None = None  # among the vocabulary, 1 = the most likely
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, None for the first, else
# {str(token id): RankedLogprob}: the prompt token first, then the top k
PromptLogprobs = list[dict[str, RankedLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------
# /v1/chat/completions
# ---------------------------------------------------------------------------

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


# -- tools (function calling; server/api/tool_calls.py does the work) ---------

MAX_TOOLS = 128  # OpenAI's limit on `tools`
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of an object; None: no arguments
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v):
        if v is None:
            return v
        kind = v.get("type")
        if kind is not None and kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise ValueError("a function's parameters must be a JSON schema of type object")
        for key, want, json_name in (("properties", dict, "object"), ("required", list, "array"),
                                     ("$defs", dict, "object")):
            if key in v and not isinstance(v[key], want):
                raise ValueError(f"`{key}` in a function's parameters must be a JSON {json_name}")
        if not all(isinstance(k, str) for k in v.get("required", [])):
            raise ValueError("`required` in a function's parameters must list property names")
        if not all(isinstance(s, (dict, bool)) for s in v.get("properties", {}).values()):
            raise ValueError("each property in a function's parameters must be a JSON schema")
        return v


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: call this one."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: ToolChoiceFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _OmitsUnset(BaseModel):
    """Serialized without its None fields: a client that merges stream deltas
    (the openai client's stream helper) would take a null for a new value."""

    @model_serializer(mode="wrap")
    def _without_nones(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_OmitsUnset):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_OmitsUnset):
    """One piece of a streamed tool call: the first carries id, type and name
    (arguments ""), the later ones argument text; `index` says which call."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools (other roles: ignored)
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    # None: "auto" with tools, "none" without (OpenAI's and vLLM's defaults)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        if v is not None and not v:
            raise ValueError("`tools` must not be an empty array; omit it to send no tools")
        names = [t.function.name for t in v or ()]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same function name")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v, info):
        if "tools" not in info.data:  # `tools` itself was refused
            return v
        tools = info.data["tools"]
        if v not in (None, "none") and not tools:
            raise ValueError("tool_choice needs `tools`")
        if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names the function `{v.function.name}`, which is not in `tools`")
        return v

    @model_validator(mode="after")
    def _chat_only(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM: the (one) prompt's, at the top


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------
# /v1/models and adapters
# ---------------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loramux"
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterInfo(BaseModel):
    name: str
    rank: int
    lora_alpha: float
    target_modules: list[str]
    size_bytes: int  # bytes of the safetensors file as uploaded
    sha256: str  # of the safetensors file
    created: int  # unix time
    source: Literal["upload", "path"] = "upload"


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class MergeSource(BaseModel):
    model_config = _STRICT

    adapter: str
    weight: float = Field(1.0, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT)


class MergeRequest(BaseModel):
    """POST /v1/adapters/merge: store Σ weight_i · ΔW_i as a new adapter.
    concat: exact, rank Σ r_i; svd: truncated to `rank` per module."""

    model_config = _STRICT

    name: str
    sources: list[MergeSource] = Field(min_length=1, max_length=MAX_MIX)
    method: Literal["concat", "svd"] = "concat"
    rank: int | None = None

    @model_validator(mode="after")
    def _rank(self):
        if self.method == "svd" and self.rank is None:
            raise ValueError("rank is required with method svd")
        if self.rank is not None and self.rank <= 0:
            raise ValueError("rank must be a positive integer")
        return self


class MergeResponse(AdapterInfo):
    method: Literal["concat", "svd"]
    sources: list[MergeSource]
    # svd: per module (PEFT module name), ||ΔW_merged - ΔW_exact||_F / ||ΔW_exact||_F
    errors: dict[str, float] | None = None


# ---------------------------------------------------------------------------
# vLLM's tokenizer endpoints
# ---------------------------------------------------------------------------

class TokenizeRequest(BaseModel):
    """POST /tokenize: a `prompt`, or chat `messages` through the chat template."""

    model_config = _STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # the tokenizer's own special tokens (BOS); vLLM's default: yes for a prompt,
    # no for messages, whose template writes its own
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of `prompt` and `messages`")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class TokenizerInfoResponse(BaseModel):
    """GET /tokenizer_info: the tokenizer's configuration, as tokenizer_config.json
    holds it (vLLM's shape; lm-eval's remote tokenizer reads eos_token,
    bos_token, pad_token and chat_template)."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


# ---------------------------------------------------------------------------
# OpenAI's fine-tuning jobs
# ---------------------------------------------------------------------------

class FineTuningJobRequest(BaseModel):
    """POST /v1/fine_tuning/jobs. The nested objects (method, hyperparameters, lora) are checked by the
    recipe (server/finetune/recipe.py), the one place their ranges live; unknown top-level fields are
    refused rather than silently dropped, since each changes what is trained."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    training_file: str
    validation_file: str | None = None
    method: dict | None = None
    hyperparameters: dict | None = None  # deprecated by OpenAI in favour of method.supervised.hyperparameters
    lora: dict | None = None  # loramux's: r, lora_alpha, lora_dropout, target_modules, use_rslora, use_dora, ...
    # part of the adapter's name, ft:<base>:<suffix>:<job-id>
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list | None = None
