"""Chat template on the tokenizer's special tokens, assistant-only loss weights, packing.

A conversation renders as

    <bos> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

Every turn ends with `<|end|>`, which is also the token that stops generation
(the "EOS" of a response). Only the assistant's text and its closing `<|end|>`
carry loss weight, so the model learns to answer and to stop, never to imitate
the user.

The tokenizer is any object with `encode(text, match_special=...) -> list[int]`, `decode(ids)`,
`pad_id`, `bos_id`, `eos_id` and `special_id(name)` (attributes or zero-argument
methods: `ChatTokens.from_tokenizer` reads either).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

ROLES = ("system", "user", "assistant")


class Tokenizer(Protocol):
    def encode(self, text: str, *, match_special: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def special_id(self, name: str) -> int: ...


def _read_id(tokenizer: Any, name: str) -> int:
    value = getattr(tokenizer, name)
    return int(value() if callable(value) else value)


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """The ids the template needs, read once from a tokenizer."""

    bos: int
    pad: int
    end: int  # closes every turn; the stop token of generation
    system: int
    user: int
    assistant: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ChatTokens:
        return cls(
            bos=_read_id(tokenizer, "bos_id"),
            pad=_read_id(tokenizer, "pad_id"),
            end=tokenizer.special_id("<|end|>"),
            system=tokenizer.special_id("<|system|>"),
            user=tokenizer.special_id("<|user|>"),
            assistant=tokenizer.special_id("<|assistant|>"),
        )

    def role(self, name: str) -> int:
        if name not in ROLES:
            raise ValueError(f"unknown chat role {name!r}; expected one of {ROLES}")
        return getattr(self, name)


def render(
    messages: Sequence[dict], tokenizer: Tokenizer, tokens: ChatTokens | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids_N int32, assistant_N bool): the token ids and which of them the assistant wrote.

    `assistant` covers the assistant's text and its `<|end|>`, not its role token.
    """
    tokens = tokens or ChatTokens.from_tokenizer(tokenizer)
    ids, assistant = [tokens.bos], [False]
    for message in messages:
        role = message["role"]
        # a message's text is text: a "<|end|>" written in it is not the stop token
        body = [*tokenizer.encode(message["content"], match_special=False), tokens.end]
        ids += [tokens.role(role), *body]
        assistant += [False] + [role == "assistant"] * len(body)
    return np.asarray(ids, np.int32), np.asarray(assistant, bool)


def render_prompt(
    messages: Sequence[dict], tokenizer: Tokenizer, tokens: ChatTokens | None = None
) -> np.ndarray:
    """Ids of a conversation up to and including the `<|assistant|>` that opens the answer.

    A trailing assistant message (the reference answer) is dropped.
    """
    tokens = tokens or ChatTokens.from_tokenizer(tokenizer)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render(messages, tokenizer, tokens)
    return np.concatenate([ids, np.asarray([tokens.assistant], np.int32)])


def sft_example(
    messages: Sequence[dict], tokenizer: Tokenizer, tokens: ChatTokens | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs_N, targets_N, weights_N) for one conversation: next-token pairs,
    weight 1 where the target is an assistant token."""
    ids, assistant = render(messages, tokenizer, tokens)
    return ids[:-1], ids[1:], assistant[1:].astype(np.float32)


def pack_examples(
    examples: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int
) -> dict[str, np.ndarray]:
    """Packs (inputs, targets, weights) examples greedily into rows of `seq_len`.

    Each example gets its own segment id (1, 2, ... within a row) and positions
    restarting at 0, so the attention mask keeps examples apart; the tail of a
    row is padding (segment 0, weight 0). Longer examples are truncated.
    Returns the pretraining batch format: inputs, targets, weights, positions,
    segment_ids, each [rows, seq_len].
    """
    rows: list[list] = []
    used = seq_len  # forces a new row for the first example
    for inputs, targets, weights in examples:
        n = min(len(inputs), seq_len)
        if n == 0:
            continue
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs[:n], targets[:n], weights[:n]))
        used += n
    out = {
        "inputs": np.zeros((len(rows), seq_len), np.int32),
        "targets": np.zeros((len(rows), seq_len), np.int32),
        "weights": np.zeros((len(rows), seq_len), np.float32),
        "positions": np.zeros((len(rows), seq_len), np.int32),
        "segment_ids": np.zeros((len(rows), seq_len), np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for segment, (inputs, targets, weights) in enumerate(row, start=1):
            span = slice(start, start + len(inputs))
            out["inputs"][r, span] = inputs
            out["targets"][r, span] = targets
            out["weights"][r, span] = weights
            out["positions"][r, span] = np.arange(len(inputs))
            out["segment_ids"][r, span] = segment
            start += len(inputs)
    return out


def pad_sequences(
    sequences: Sequence[np.ndarray], length: int, pad_id: int, side: str = "right"
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BL, mask_BL): sequences padded to `length` on `side`, mask 1 on real tokens.

    Sequences longer than `length` keep their first `length` tokens.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        seq = np.asarray(seq)[:length]
        span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        tokens[i, span] = seq
        mask[i, span] = 1
    return tokens, mask


def preference_batch(
    pairs: Sequence[dict], tokenizer: Tokenizer, length: int, side: str = "right"
) -> dict[str, np.ndarray]:
    """Pairs `{"prompt": messages, "chosen": text, "rejected": text}` -> the pair batch.

    For each of "chosen" and "rejected": `{side}_tokens` [B, L] (prompt + answer),
    `{side}_mask` [B, L] (1 on real tokens) and `{side}_loss_mask` [B, L] (1 on the
    answer's tokens, its `<|end|>` included). The reward model reads the last real
    token; DPO scores the answer tokens.
    """
    tokens = ChatTokens.from_tokenizer(tokenizer)
    out = {}
    for name in ("chosen", "rejected"):
        seqs, answer_masks = [], []
        for pair in pairs:
            messages = [*pair["prompt"], {"role": "assistant", "content": pair[name]}]
            ids, assistant = render(messages, tokenizer, tokens)
            seqs.append(ids)
            answer_masks.append(assistant.astype(np.int32))
        out[f"{name}_tokens"], out[f"{name}_mask"] = pad_sequences(seqs, length, tokens.pad, side)
        out[f"{name}_loss_mask"], _ = pad_sequences(answer_masks, length, 0, side)
    return out
