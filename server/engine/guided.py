"""Structured outputs: what a request's output must match, and the per-row
token masks that keep it there (xgrammar, as in vLLM and SGLang).

    GuideSpec      what the request asked for (a JSON schema, any JSON, a
                   regex, a choice of strings, an EBNF grammar), as text;
    Guide          that spec compiled against this model's vocabulary
                   (grammar_compiler.py compiles it, off the engine thread);
    GuideMatcher   one request's position in its grammar (engine thread);
    GuideMasks     one step's bitmasks for the rows that have a matcher.

Only the rows with a matcher are masked: every other row of the batch (base,
adapter, DoRA, mix) is sampled from exactly the logits it had.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch and xgrammar load with the first grammar, not with this module
    import torch

GuideKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
GUIDE_KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GuideSpec:
    """A constraint on the output, as the request gave it. `value` is text:
    the schema as compact JSON, the regex, the EBNF, or the choices as a
    JSON list; (kind, value) is the key the compiled grammar is cached under.
    `param` names the request field, for errors."""

    kind: GuideKind
    value: str
    param: str

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.value

    @classmethod
    def json_schema(cls, schema: dict, param: str) -> "GuideSpec":
        # keys keep their order: a schema's property order is the output's
        return cls("json_schema", json.dumps(schema, separators=(",", ":")), param)


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of `choices` (JSON string escapes, which
    xgrammar's EBNF literals read)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


@dataclass(frozen=True)
class Guide:
    """A compiled grammar (xgrammar.CompiledGrammar); shared by every request
    with the same spec, each with its own matcher."""

    spec: GuideSpec
    compiled: object  # xgrammar.CompiledGrammar
    # [ceil(V/32)] int32 bitmask of the tokens the grammar may ever use beyond
    # its own rules (see control_free_tokens); None: all of them
    allowed: torch.Tensor | None = None

    def matcher(self) -> "GuideMatcher":
        return GuideMatcher(self.compiled, self.allowed)


# xgrammar's JSON strings take raw control characters (U+0001..U+001F), which
# JSON forbids and strict parsers (Python's json) refuse. Compact JSON (no
# free whitespace, see grammar_compiler) never needs one, so JSON guides
# also ban every token that contains one.
JSON_KINDS = frozenset({"json_schema", "json_object"})


def control_free_tokens(tokenizer_info) -> "torch.Tensor":
    """[ceil(V/32)] int32 bitmask (xgrammar's layout: bit j of word w is
    token 32w + j) of the tokens whose text has no byte below 0x20; special
    tokens such as EOS stay (their text is their name)."""
    import torch

    vocab = tokenizer_info.vocab_size
    words = -(-vocab // 32)
    bits = torch.zeros(words * 32, dtype=torch.int64)
    for i, text in enumerate(tokenizer_info.decoded_vocab[:vocab]):
        bits[i] = all(b >= 0x20 for b in text)
    packed = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)  # [W] in 0 .. 2**32 - 1
    return (packed - (packed >= 2**31).long() * 2**32).to(torch.int32)  # the same bits as int32


class GuideMatcher:
    """Where one request stands in its grammar. Used only in the engine thread."""

    def __init__(self, compiled, allowed: torch.Tensor | None = None):
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled)
        self._allowed = allowed

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        # bitmask: [R, ceil(V/32)] int32; row `row` gets the tokens allowed next
        self._m.fill_next_token_bitmask(bitmask, row)
        if self._allowed is not None:
            bitmask[row] &= self._allowed

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar does not allow it."""
        return bool(self._m.accept_token(token))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self._m.is_terminated())


class GuideMasks:
    """The token bitmasks of one step's guided rows: `rows` are the indices
    (into the step's logits [N, V]) of the rows with a matcher."""

    def __init__(self, matchers: list[GuideMatcher | None], vocab_size: int):
        import xgrammar as xgr

        self.rows = [i for i, m in enumerate(matchers) if m is not None]
        self.vocab_size = vocab_size
        # [N, ceil(V/32)] int32; only the guided rows are filled and applied
        self.bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
        for i in self.rows:
            matchers[i].fill(self.bitmask, i)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens of the guided rows of logits [N, V] to
        -inf, in place; the other rows are not touched."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device), vocab_size=self.vocab_size,
                                        indices=self.rows)
