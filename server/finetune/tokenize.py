"""Training rows -> token ids and labels, tokenized exactly as serving tokenizes a request.

Which tokens carry the loss (the rest get the label -100):

- Chat rows (`{"messages": [...]}`) go through the model's chat template, the same call
  (`chat_token_ids`) that `/v1/chat/completions` makes. Only assistant turns with `weight` 1 are
  learned; system and user turns, the template's default system prompt, the `<|im_start|>assistant`
  header of each turn and assistant turns with `weight` 0 are context only. A learned turn's tokens are
  found by rendering the conversation up to it with the generation prompt and through it without: the
  tokens between the two are the turn's. Both renderings must be token prefixes of the whole
  conversation's; a template that rewrites earlier turns (so that this does not hold) is refused with a
  ValueError rather than trained on misplaced labels. The turn's end-of-turn token (the tokenizer's EOS,
  `<|im_end|>` for SmolLM2) is learned, so the model learns to stop; whatever the template writes after
  it (a newline before the next turn) is not, since generation stops at that token and never writes it.
  A learned turn must follow at least one other message (its prompt); a conversation that opens with
  one is refused with a ValueError.
- Prompt/completion rows: the prompt's tokens as `/v1/completions` tokenizes a text prompt, then the
  completion's tokens and EOS. The completion and EOS are learned, the prompt is not.
- A row longer than the sequence length (`min(1024, the model's context)`) is cut at the end: its first
  max_length tokens are kept and whatever was learned among them still is. A row left with no learned
  token (cut before its first assistant token, or with nothing to learn at all) is skipped. The counts
  of truncated (kept, but cut) and skipped rows are reported with the set.

The first token of a row is never learned: a causal LM predicts token i from the tokens before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from loramux.server.finetune.data import ChatRow, CompletionRow, TrainingRow
from loramux.server.model.loader import chat_token_ids

IGNORE = -100  # the label of a token without loss (PyTorch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Example:
    """One row: input_ids[i] and labels[i] (labels[i] = input_ids[i] where learned, else IGNORE)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def learned_tokens(self) -> int:
        """Positions with a loss; position 0 has none (nothing comes before it to predict it from)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass(frozen=True)
class EncodedSet:
    examples: tuple[Example, ...]
    truncated: int  # rows kept but cut to max_length
    skipped: int  # rows dropped: no learned token left

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def encode_rows(rows: Iterable[TrainingRow], tokenizer, max_length: int) -> EncodedSet:
    """Every row as an Example of at most max_length tokens (see the module docstring)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    examples, truncated, skipped = [], 0, 0
    for row in rows:
        ids, labels = _encode_chat(row, tokenizer) if isinstance(row, ChatRow) else _encode_completion(row, tokenizer)
        labels[0] = IGNORE
        cut = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            skipped += 1
            continue
        truncated += cut
        examples.append(Example(ids, labels))
    return EncodedSet(tuple(examples), truncated, skipped)


def _end_of_turn(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so a trained model could not learn to stop")
    return tokenizer.eos_token_id


def _encode_chat(row: ChatRow, tokenizer) -> tuple[list[int], list[int]]:
    messages = [{"role": t.role, "content": t.content} for t in row.messages]
    ids = chat_token_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    end = _end_of_turn(tokenizer)
    for i, turn in enumerate(row.messages):
        if turn.role != "assistant" or turn.weight != 1:
            continue
        if i == 0:  # no conversation before it to render: where its tokens begin is unknowable
            raise ValueError("a learned assistant turn cannot be a conversation's first message; "
                             "put a user (or system) message before it, or give it weight 0")
        # ids:  [ ... conversation before turn i, assistant header | turn i's tokens ... <eot> \n | rest ]
        #                                                   start ^                    stop ^
        start = _prefix_length(ids, chat_token_ids(tokenizer, messages[:i], add_generation_prompt=True), i)
        through = _prefix_length(ids, chat_token_ids(tokenizer, messages[: i + 1], add_generation_prompt=False), i)
        turn_ids = ids[start:through]
        # The last EOS of the turn is the template's end marker (content may hold the same text before it).
        stop = start + len(turn_ids) - turn_ids[::-1].index(end) if end in turn_ids else through
        labels[start:stop] = ids[start:stop]
    return ids, labels


def _prefix_length(ids: list[int], prefix: list[int], turn: int) -> int:
    if ids[: len(prefix)] != prefix:
        raise ValueError(
            f"the chat template renders message {turn} differently inside the whole conversation than after "
            f"the messages before it, so its tokens cannot be told apart; loss masking needs a template whose "
            f"renderings of a conversation's prefixes are prefixes of its rendering")
    return len(prefix)


def _encode_completion(row: CompletionRow, tokenizer) -> tuple[list[int], list[int]]:
    prompt = list(tokenizer.encode(row.prompt))
    completion = list(tokenizer.encode(row.completion, add_special_tokens=False)) + [_end_of_turn(tokenizer)]
    return prompt + completion, [IGNORE] * len(prompt) + completion
