"""Function tools on /v1/chat/completions: OpenAI's `tools`, `tool_choice` and
`parallel_tool_calls`, served the way vLLM serves them (hermes parser).

    ToolPlan        what a validated request asks for: its function tools and
                    the mode (none, auto, required, or one named function);
    render_chat_ids the conversation through the chat template: with the
                    template's own tool support where it has one, else the
                    Hermes fallback (tools listed in the system prompt, calls
                    as <tool_call> blocks, results as <tool_response> blocks);
    ToolPlan.guide  required / named: the JSON schema the output is held to
                    (the engine's grammar), so the arguments always parse;
    parsers         the model's text -> content and tool call deltas, fed one
                    piece at a time (streaming) or all at once (a whole reply).
                    A reply is the stream fed in one piece, so a streamed reply
                    put together always equals the non-streamed one.

What each mode produces (as vLLM):

    none      plain content; the tools are not rendered, nothing is parsed
    auto      every complete <tool_call>{"name": ..., "arguments": {...}}</tool_call>
              whose name is a tool becomes a call; any other text (invalid
              blocks included) stays content
    required  the output is a JSON array [{"name": ..., "parameters": {...}}, ...]
              (one item without parallel calls); each item becomes a call
    named     the output is the function's arguments object
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

from loramux.server.api.protocol import (
    ChatCompletionRequest, ChatMessage, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
    NamedToolChoice, ToolCall,
)
from loramux.server.engine.guided import GuideSpec
from loramux.server.errors import Invalid
from loramux.server.model.loader import chat_token_ids

ToolMode = Literal["none", "auto", "required", "named"]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a function without parameters takes {}

# The system prompt that lists the tools when the chat template cannot (the
# Hermes / Qwen2.5 format that many open models were tuned on); "{tools}" is
# one JSON tool per line.
HERMES_TOOLS_PROMPT = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolPlan:
    """The tool side of one validated chat request."""

    mode: ToolMode
    tools: tuple[dict, ...] = ()  # OpenAI function tools as plain JSON
    function: str | None = None  # the named function
    parallel: bool = True  # more than one call allowed

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> "ToolPlan":
        tools = tuple(t.model_dump(exclude_none=True) for t in body.tools or ())
        choice = body.tool_choice
        parallel = body.parallel_tool_calls is not False  # None: the default, true
        if not tools or choice == "none":
            return cls("none")
        if isinstance(choice, NamedToolChoice):
            return cls("named", tools, choice.function.name, parallel=False)
        return cls("required" if choice == "required" else "auto", tools, parallel=parallel)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    def parameters(self, name: str) -> dict:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or EMPTY_PARAMETERS

    def template_tools(self) -> list[dict] | None:
        """The tools the prompt shows the model (none with tool_choice none)."""
        return list(self.tools) if self.mode != "none" else None

    def guide(self) -> GuideSpec | None:
        """required / named: the schema the output must match (it overrides
        response_format, as in vLLM); None otherwise."""
        if self.mode == "named":
            return GuideSpec.json_schema(self.parameters(self.function), "tool_choice")
        if self.mode == "required":
            return GuideSpec.json_schema(self._calls_schema(), "tool_choice")
        return None

    def _calls_schema(self) -> dict:
        """A JSON array of {"name": one tool, "parameters": its arguments}, at
        least one item (exactly one without parallel calls). Each tool's $defs
        move to the root, where their "#/$defs/..." references still point."""
        items, defs = [], {}
        for name in (t["function"]["name"] for t in self.tools):
            params = dict(self.parameters(name))
            for key, schema in params.pop("$defs", {}).items():
                if defs.setdefault(key, schema) != schema:
                    raise Invalid(f"two tools define `$defs` `{key}` differently", "tools")
            items.append({"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                           "parameters": params},
                          "required": ["name", "parameters"], "additionalProperties": False})
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return schema

    def parser(self) -> "OutputParser":
        """A fresh parser for one choice's output."""
        if self.mode == "auto":
            return HermesParser(self.names, self.parallel)
        if self.mode == "required":
            return RequiredParser()
        if self.mode == "named":
            return NamedParser(self.function)
        return OutputParser()

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        """OpenAI's finish reason: "tool_calls" when the choice called tools and
        stopped on its own; a length cut stays "length", and a named function
        reports "stop" (vLLM's resolve_finish_reason)."""
        if called and engine_reason == "stop" and self.mode != "named":
            return "tool_calls"
        return engine_reason


# ---------------------------------------------------------------------------
# the prompt
# ---------------------------------------------------------------------------

_PROBE_TOOL = "loramux_probe_tool"
_renders_tools: dict[str, bool] = {}  # chat template text -> whether it shows `tools`


def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template shows the tools it is given (a
    probe conversation rendered with and without one tool), cached per template."""
    key = str(tokenizer.chat_template)
    if key not in _renders_tools:
        probe = [{"role": "user", "content": "hello"}]
        tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                 "parameters": EMPTY_PARAMETERS}}
        try:
            bare = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            shown = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False, add_generation_prompt=True)
            _renders_tools[key] = shown != bare and _PROBE_TOOL in shown
        except Exception:  # a template that fails on tools does not support them
            _renders_tools[key] = False
    return _renders_tools[key]


def hermes_tools_prompt(tools: list[dict]) -> str:
    return HERMES_TOOLS_PROMPT.replace("{tools}", "\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def _arguments(call: ToolCall):
    """A history call's arguments as JSON (an object when its text parses)."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def native_turns(messages: list[ChatMessage]) -> list[dict]:
    """The conversation as transformers' tool-use templates read it (call
    arguments as objects, as vLLM passes them)."""
    turns = []
    for m in messages:
        turn = {"role": m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.function.name, "arguments": _arguments(c)}}
                                  for c in m.tool_calls]
        if m.role == "tool" and m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


def hermes_turns(messages: list[ChatMessage], tools: list[dict] | None) -> list[dict]:
    """The conversation in plain turns for a template without tool support:
    the tools prompt appended to the system message (or as one), assistant
    calls re-rendered as <tool_call> blocks, and each run of tool results one
    user turn of <tool_response> blocks."""
    turns: list[dict] = []
    tool_run = False  # the last turn holds tool responses
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if tool_run:
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block})
            tool_run = True
            continue
        tool_run = False
        content = m.text()
        if m.role == "assistant" and m.tool_calls:
            blocks = [TOOL_CALL_OPEN + "\n" + json.dumps({"name": c.function.name, "arguments": _arguments(c)},
                                                          ensure_ascii=False) + "\n" + TOOL_CALL_CLOSE
                      for c in m.tool_calls]
            content = "\n".join(([content] if content else []) + blocks)
        turns.append({"role": m.role, "content": content})
    if tools:
        prompt = hermes_tools_prompt(tools)
        if turns and turns[0]["role"] in ("system", "developer"):
            turns[0]["content"] = (turns[0]["content"] + "\n\n" + prompt) if turns[0]["content"] else prompt
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns


def uses_tools(messages: list[ChatMessage], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.role == "tool" or (m.role == "assistant" and m.tool_calls) for m in messages)


def render_chat_ids(tokenizer, messages: list[ChatMessage], tools: list[dict] | None,
                    add_generation_prompt: bool = True, add_special_tokens: bool = False) -> list[int]:
    """The prompt's token ids: the chat template with `tools` where it renders
    them, else the Hermes fallback (hermes_turns). Blocking: run in a thread."""
    if not uses_tools(messages, tools):
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        return chat_token_ids(tokenizer, turns, add_generation_prompt, add_special_tokens)
    if not template_renders_tools(tokenizer):
        return chat_token_ids(tokenizer, hermes_turns(messages, tools), add_generation_prompt, add_special_tokens)
    text = tokenizer.apply_chat_template(native_turns(messages), tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def conversation_chars(messages: list[ChatMessage], tools: list[dict] | None) -> int:
    """About how many characters the rendered conversation has (a length cap
    that needs no tokenizing)."""
    chars = sum(len(m.text()) + sum(len(c.function.name) + len(c.function.arguments) for c in m.tool_calls or ())
                for m in messages)
    return chars + (len(json.dumps(tools)) if tools else 0)


# ---------------------------------------------------------------------------
# the output
# ---------------------------------------------------------------------------

def _call_header(index: int, name: str) -> DeltaMessage:
    return DeltaMessage(tool_calls=[DeltaToolCall(index=index, id=new_call_id(), type="function",
                                                  function=DeltaFunctionCall(name=name, arguments=""))])


def _call_arguments(index: int, text: str) -> DeltaMessage:
    return DeltaMessage(tool_calls=[DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=text))])


class OutputParser:
    """tool_choice none (or no tools): every piece of text is content.

    A parser is fed one choice's text piece by piece (`feed`), then `finish`;
    each returns the deltas to send, in order. `called`: a tool call was sent."""

    def __init__(self):
        self.called = False

    def feed(self, text: str) -> list[DeltaMessage]:
        return [DeltaMessage(content=text)] if text else []

    def finish(self) -> list[DeltaMessage]:
        return []


class NamedParser(OutputParser):
    """A named function: the whole output (held to its parameters schema) is
    the arguments of one call."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def feed(self, text: str) -> list[DeltaMessage]:
        if not text:
            return []
        out = [] if self.called else [_call_header(0, self.name)]
        self.called = True
        return out + [_call_arguments(0, text)]


def _partial_overlap(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_block(body: str, names: frozenset[str]) -> list[tuple[str, dict]] | None:
    """The calls in one <tool_call> block: a JSON object {"name": a tool,
    "arguments": an object}, or a list of them (SmolLM2's own format); None
    when the block is anything else."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments"), dict)):
            return None
        calls.append((item["name"], item["arguments"]))
    return calls or None


class HermesParser(OutputParser):
    """tool_choice auto: <tool_call> blocks become calls, the rest content.

    Text outside blocks streams as content as it comes, except the end that
    could begin "<tool_call>", held until it cannot. A block is held until it
    closes (or the output ends), then sent as calls if it is valid, or as
    content if not: so a call is never sent that turns out not to be one.
    Whitespace-only content is held too, and dropped when the reply turns
    out to be only tool calls (content null)."""

    def __init__(self, names: frozenset[str], parallel: bool):
        super().__init__()
        self.names, self.parallel = names, parallel
        self.pending = ""  # text not yet sent: a possible tag start, or an open block's body
        self.in_block = False
        self.calls = 0
        self.spoke = False  # content other than whitespace was sent
        self.held = ""  # whitespace-only content not yet sent

    def feed(self, text: str) -> list[DeltaMessage]:
        self.pending += text
        out: list[DeltaMessage] = []
        while True:
            if not self.in_block:
                at = self.pending.find(TOOL_CALL_OPEN)
                if at < 0:
                    keep = len(self.pending) - _partial_overlap(self.pending, TOOL_CALL_OPEN)
                    self._content(self.pending[:keep], out)
                    self.pending = self.pending[keep:]
                    return out
                self._content(self.pending[:at], out)
                self.pending = self.pending[at + len(TOOL_CALL_OPEN):]
                self.in_block = True
            else:
                end = self.pending.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return out
                body, self.pending = self.pending[:end], self.pending[end + len(TOOL_CALL_CLOSE):]
                self.in_block = False
                self._block(body, TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE, out)

    def finish(self) -> list[DeltaMessage]:
        out: list[DeltaMessage] = []
        if self.in_block:  # the output ended inside a block: a call if its JSON is whole (as vLLM)
            body = self.pending[:len(self.pending) - _partial_overlap(self.pending, TOOL_CALL_CLOSE)]
            self._block(body, TOOL_CALL_OPEN + self.pending, out)
        else:
            self._content(self.pending, out)
        self.pending, self.in_block = "", False
        if self.held and not self.calls:
            out.append(DeltaMessage(content=self.held))
        self.held = ""
        return out

    def _content(self, text: str, out: list[DeltaMessage]) -> None:
        if not text:
            return
        if not self.spoke and not text.strip():
            self.held += text
            return
        out.append(DeltaMessage(content=self.held + text))
        self.held, self.spoke = "", True

    def _block(self, body: str, raw: str, out: list[DeltaMessage]) -> None:
        calls = parse_block(body, self.names)
        if calls is None:
            self._content(raw, out)
            return
        for name, arguments in calls:
            if self.calls and not self.parallel:  # only the first call (vLLM)
                continue
            out += [_call_header(self.calls, name), _call_arguments(self.calls, json.dumps(arguments,
                                                                                         ensure_ascii=False))]
            self.calls += 1
        self.called = self.calls > 0


@dataclass
class _ArrayItem:
    """Where one item of the required array sits in the text: `name` once
    its string has closed; the `parameters` value from `args_start`, to
    `args_end` once it has closed."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None


_ARRAY, _ITEM = ["["], ["[", "{"]  # the scanner's stack in the array, in one of its items


def _json_string(raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


@dataclass
class _ArrayScanner:
    """Reads a JSON array of {"name": ..., "parameters": ...} objects one
    character at a time. Prefix-stable: what it has found in a prefix of the
    text, it finds in the whole text. Depth 1 is the array, depth 2 an item.

        [ {"name": "f", "parameters": {"x": 1}} , {...} ]
        ^ ^ depth 2 ...   value start ^      ^ value end (back at depth 2)
    """

    text: str = ""
    stack: list[str] = field(default_factory=list)
    in_string: bool = False
    escaped: bool = False
    scalar: bool = False  # inside a bare value (number, true, ...) of an item key
    token_start: int = 0  # where the current item-level string or value began; -1: a key read, its value not begun
    key: str | None = None  # the item key whose value comes next
    expect_key: bool = False
    items: list[_ArrayItem] = field(default_factory=list)

    def feed(self, text: str) -> None:
        start = len(self.text)
        self.text += text
        for i in range(start, len(self.text)):
            self._step(i, self.text[i])

    def _step(self, i: int, c: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                if self.stack == _ITEM:
                    self._string_closed(i + 1)
            return
        if self.scalar:
            if c.isalnum() or c in "+-.":
                return
            self.scalar = False
            self._value_closed(i)
        if c.isspace():
            return
        in_item = self.stack == _ITEM
        value_here = in_item and not self.expect_key and self.key is not None and self.token_start < 0
        if c == '"':
            self.in_string = True
            if in_item:
                self._begin(i, value_here)
        elif c in "{[":
            if self.stack == _ARRAY and c == "{":
                self.items.append(_ArrayItem())
                self.expect_key, self.key = True, None
            elif value_here:
                self._begin(i, True)
            self.stack.append(c)
        elif c in "}]":
            if self.stack:
                self.stack.pop()
            if self.stack == _ITEM:
                self._value_closed(i + 1)
        elif in_item and c == ",":
            self.expect_key, self.key = True, None
        elif value_here and c != ":":
            self._begin(i, True)
            self.scalar = True

    def _begin(self, i: int, is_value: bool) -> None:
        self.token_start = i
        if is_value and self.key == "parameters" and self.items[-1].args_start is None:
            self.items[-1].args_start = i

    def _string_closed(self, end: int) -> None:
        if self.expect_key:
            self.key, self.expect_key, self.token_start = _json_string(self.text[self.token_start:end]), False, -1
        else:
            self._value_closed(end)

    def _value_closed(self, end: int) -> None:
        item = self.items[-1]
        if self.key == "name" and item.name is None:
            item.name = _json_string(self.text[self.token_start:end])
        elif self.key == "parameters" and item.args_end is None:
            item.args_end = end
        self.key = None


class RequiredParser(OutputParser):
    """tool_choice required: the output (held to the calls schema) is a JSON
    array of {"name", "parameters"}; each item is sent as a call once its
    name has closed and its parameters began, then its parameters text as it
    grows (trailing whitespace held until the value goes on)."""

    def __init__(self):
        super().__init__()
        self.scanner = _ArrayScanner()
        self.sent: list[int] = []  # per announced item: where its sent arguments end

    def feed(self, text: str) -> list[DeltaMessage]:
        if not text:
            return []
        self.scanner.feed(text)
        full = self.scanner.text
        out: list[DeltaMessage] = []
        for k, item in enumerate(self.scanner.items):
            if item.name is None or item.args_start is None:
                break  # items come in order: nothing later is ready
            if k == len(self.sent):
                out.append(_call_header(k, item.name))
                self.sent.append(item.args_start)
            end = item.args_end if item.args_end is not None else max(item.args_start, len(full.rstrip()))
            if end > self.sent[k]:
                out.append(_call_arguments(k, full[self.sent[k]:end]))
                self.sent[k] = end
        self.called = bool(self.sent)
        return out


def assemble(deltas: list[DeltaMessage]) -> tuple[str | None, list[ToolCall]]:
    """A whole reply from its deltas: the content (null when there is none
    beside tool calls) and the calls, as a non-streamed response carries them."""
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        for piece in d.tool_calls or ():
            if piece.id is not None:
                calls[piece.index] = ToolCall(id=piece.id, function=FunctionCall(name=piece.function.name,
                                                                                  arguments=""))
            calls[piece.index].function.arguments += piece.function.arguments or ""
    return (content if content or not calls else None), [calls[k] for k in sorted(calls)]


def parse_reply(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """One choice's whole output -> (content, tool calls): the stream's parser
    fed the text in one piece."""
    parser = plan.parser()
    return assemble(parser.feed(text) + parser.finish())
