"""JSON schemas for structured-output tests: every value bounded, so that
even a random model finishes them."""

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "member": {"type": "boolean"},
        "tier": {"enum": ["gold", "silver", "none"]},
    },
    "required": ["name", "member", "tier"],
    "additionalProperties": False,
}
