"""Which output constraint a request asks for, as a GuideSpec.

One request field at most (protocol.py refuses two): OpenAI's
`response_format` (json_object, json_schema), vLLM's `structured_outputs`
(json, regex, choice, grammar, json_object), or vLLM's older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. The spec's `param` names
the field, so a schema that does not compile is a 400 that says where.
"""
from __future__ import annotations

import json

from loramux.server.engine.guided import GuideSpec


def _one_of(param: str, json_schema: dict | None, regex: str | None, choice: list[str] | None,
            grammar: str | None) -> GuideSpec | None:
    """The spec of whichever of the four is set (protocol.py allows one);
    `param` formats with the field's own name."""
    if json_schema is not None:
        return GuideSpec.json_schema(json_schema, param.format("json"))
    if regex is not None:
        return GuideSpec("regex", regex, param.format("regex"))
    if choice is not None:
        return GuideSpec("choice", json.dumps(choice, ensure_ascii=False), param.format("choice"))
    if grammar is not None:
        return GuideSpec("grammar", grammar, param.format("grammar"))
    return None


def guide_for(body) -> GuideSpec | None:
    """The constraint of a validated completions or chat body; None for free text."""
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        return GuideSpec("json_object", "", "response_format")
    if rf is not None and rf.type == "json_schema":
        return GuideSpec.json_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
    so = body.structured_outputs
    if so is not None:
        return _one_of("structured_outputs.{}", so.json_, so.regex, so.choice, so.grammar) or \
            GuideSpec("json_object", "", "structured_outputs.json_object")
    return _one_of("guided_{}", body.guided_json, body.guided_regex, body.guided_choice, body.guided_grammar)
