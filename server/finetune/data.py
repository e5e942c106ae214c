"""Training files: JSONL checked line by line into typed rows, once, at upload.

Two row formats, as OpenAI's fine-tuning accepts them:

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "weight": 0},   # context, not learned
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}                # learned (weight 1)
    {"prompt": "...", "completion": "..."}

Only assistant turns are learned, each unless it says `weight: 0`, and a
chat row needs at least one. OpenAI fields this server cannot train on
(tools, function calls, names, preference rows) are refused by name rather
than dropped, so a job never learns something other than what the file says.
Every refusal names its 1-based line: "line 3: messages[1]: unknown role 'bot'".
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass

from loramux.server.errors import Invalid

MAX_ROWS = 1_000_000
ROLES = ("system", "user", "assistant")

# Row and message fields of OpenAI's formats that training here does not use, and why.
_UNSUPPORTED_ROW_KEYS = {
    "tools": "tool-calling fine-tuning is not supported",
    "parallel_tool_calls": "tool-calling fine-tuning is not supported",
    "functions": "function-calling fine-tuning is not supported",
    "input": "preference (DPO) rows are not supported; use `messages` or `prompt` and `completion`",
    "preferred_output": "preference (DPO) rows are not supported; use `messages` or `prompt` and `completion`",
    "non_preferred_output": "preference (DPO) rows are not supported; use `messages` or `prompt` and `completion`",
}
_UNSUPPORTED_MESSAGE_KEYS = {
    "name": "participant names are not supported",
    "tool_calls": "tool-calling fine-tuning is not supported",
    "tool_call_id": "tool-calling fine-tuning is not supported",
    "function_call": "function-calling fine-tuning is not supported",
}


class TrainingDataError(Invalid):
    """A training file that cannot be trained on; the message names the line."""

    code = "invalid_training_file"

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message if line is None else f"line {line}: {message}", "file")
        self.line = line


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str
    weight: int  # 1: the loss is taken on this turn (assistant turns only), 0: context


@dataclass(frozen=True)
class ChatRow:
    messages: tuple[Turn, ...]


@dataclass(frozen=True)
class CompletionRow:
    prompt: str
    completion: str  # learned; never empty


TrainingRow = ChatRow | CompletionRow


class _Refused(Exception):
    """Why one row is refused (parse_training_jsonl adds the line)."""


def parse_training_jsonl(data: bytes) -> list[TrainingRow]:
    """Every row of a JSONL training file (UTF-8, one JSON object a line,
    blank lines skipped); TrainingDataError naming the first bad line."""
    data = data.removeprefix(codecs.BOM_UTF8)  # what some editors write first
    rows: list[TrainingRow] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TrainingDataError(f"not UTF-8 text (byte {exc.start + 1} of the line)", number) from None
        if not text.strip():
            continue
        if len(rows) == MAX_ROWS:
            raise TrainingDataError(f"a training file holds at most {MAX_ROWS} rows", number)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainingDataError(f"not valid JSON ({exc.msg} at column {exc.colno})", number) from None
        except RecursionError:
            raise TrainingDataError("not valid JSON (nested too deeply)", number) from None
        try:
            rows.append(_row(obj))
        except _Refused as exc:
            raise TrainingDataError(str(exc), number) from None
    if not rows:
        raise TrainingDataError("the training file has no rows")
    return rows


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _shown(value) -> str:
    """A value in a message: strings quoted as 'x', anything else as JSON; long ones cut."""
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown_keys(obj: dict, known: tuple[str, ...], unsupported: dict[str, str], where: str = "") -> None:
    for key in obj:
        if key in known:
            continue
        if key in unsupported:
            raise _Refused(f"{where}`{key}`: {unsupported[key]}")
        raise _Refused(f"{where}unknown field {_shown(key)}; expected {', '.join(f'`{k}`' for k in known)}")


def _row(obj) -> TrainingRow:
    if not isinstance(obj, dict):
        raise _Refused(f"each line must be a JSON object, got {_json_type(obj)}")
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            raise _Refused("a row has either `messages` or `prompt` and `completion`, not both")
        _unknown_keys(obj, ("messages",), _UNSUPPORTED_ROW_KEYS)
        return _chat_row(obj["messages"])
    if "prompt" in obj or "completion" in obj:
        _unknown_keys(obj, ("prompt", "completion"), _UNSUPPORTED_ROW_KEYS)
        return _completion_row(obj)
    unsupported = [k for k in obj if k in _UNSUPPORTED_ROW_KEYS]
    if unsupported:
        raise _Refused(f"`{unsupported[0]}`: {_UNSUPPORTED_ROW_KEYS[unsupported[0]]}")
    raise _Refused("a row needs `messages` (chat) or `prompt` and `completion`")


def _completion_row(obj: dict) -> CompletionRow:
    for key in ("prompt", "completion"):
        if key not in obj:
            raise _Refused(f"`{key}` is missing")
        if not isinstance(obj[key], str):
            raise _Refused(f"`{key}` must be a string, got {_json_type(obj[key])}")
    if not obj["completion"]:
        raise _Refused("`completion` is empty: there is nothing to learn")
    return CompletionRow(obj["prompt"], obj["completion"])


def _chat_row(messages) -> ChatRow:
    if not isinstance(messages, list) or not messages:
        raise _Refused("`messages` must be a non-empty array of messages")
    turns = tuple(_turn(m, f"messages[{i}]: ") for i, m in enumerate(messages))
    learned = [i for i, t in enumerate(turns) if t.weight == 1]
    if not learned:
        raise _Refused("no assistant turn to learn from (a chat row needs an assistant message without weight 0)")
    for i in learned:
        if not turns[i].content:
            raise _Refused(f"messages[{i}]: the assistant turn to learn from is empty")
    if learned[0] == 0:  # the chat template has no prompt to condition it on (tokenize.py relies on this)
        raise _Refused("messages[0]: a learned assistant turn cannot be a conversation's first message; put a "
                       "user (or system) message before it, or give it weight 0")
    return ChatRow(turns)


def _turn(message, where: str) -> Turn:
    if not isinstance(message, dict):
        raise _Refused(f"{where}a message must be an object, got {_json_type(message)}")
    if "role" not in message:
        raise _Refused(f"{where}`role` is missing")
    role = message["role"]
    if role not in ROLES:
        raise _Refused(f"{where}unknown role {_shown(role)}; a role is one of {', '.join(ROLES)}")
    _unknown_keys(message, ("role", "content", "weight"), _UNSUPPORTED_MESSAGE_KEYS, where)
    if "content" not in message:
        raise _Refused(f"{where}`content` is missing")
    content = _text(message["content"], where)
    if "weight" not in message:
        return Turn(role, content, 1 if role == "assistant" else 0)
    if role != "assistant":
        raise _Refused(f"{where}`weight` is allowed on assistant turns only (only they are learned)")
    weight = message["weight"]
    if isinstance(weight, bool) or not isinstance(weight, int) or weight not in (0, 1):
        raise _Refused(f"{where}`weight` must be 0 or 1, got {_shown(weight)}")
    return Turn(role, content, weight)


def _text(content, where: str) -> str:
    """A message's content: a string, or text parts joined as the chat route joins them."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _Refused(f"{where}`content` must be a string or an array of text parts, got {_json_type(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _Refused(f"{where}content[{j}]: only text parts {{\"type\": \"text\", \"text\": \"...\"}} "
                           "are supported")
        texts.append(part["text"])
    return "".join(texts)
