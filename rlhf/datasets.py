"""The post-training data sets as arrays: mined once into JSONL, then chat rows, preference
pairs and prompts for the steps. (What is mined: rlhf/stdlib_tasks.py.)

A pipeline directory keeps the mined sets in DIR/posttrain_data/*.jsonl, written once
(atomically) and read by every stage, so all stages see the same split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from data.sources import parse_spec
from rlhf import chat, stdlib_tasks

SETS = ("sft_train", "sft_eval", "pairs_train", "pairs_eval")


def check_held_out(config: ConfigDict) -> None:
    """Refuses a pretraining corpus that contains the evaluation's held-out files."""
    spec = parse_spec(config.pretrain.data.corpus)
    fraction = config.posttrain_data.eval_fraction
    if (
        spec.kind in ("stdlib", "python")
        and not config.posttrain_data.root
        and spec.holdout < fraction
    ):
        raise ValueError(
            f"pretrain.data.corpus={str(spec)!r} includes files that posttrain_data."
            f"eval_fraction={fraction} holds out for evaluation; use "
            f"'stdlib:holdout={fraction}'"
        )


def load(config: ConfigDict, root: Path) -> dict[str, list[dict]]:
    """The mined SFT / preference sets of pipeline directory `root`, mined on first use."""
    check_held_out(config)
    directory = root / "posttrain_data"
    if not all((directory / f"{n}.jsonl").exists() for n in SETS):
        dc = config.posttrain_data
        data = stdlib_tasks.build_datasets(
            root=dc.root or None,
            eval_fraction=dc.eval_fraction,
            seed=config.seed,
            max_files=dc.max_files or None,
            max_chars=dc.max_chars,
        )
        for name in SETS:
            stdlib_tasks.write_jsonl(directory / f"{name}.jsonl", data[name])
    return {n: stdlib_tasks.read_jsonl(directory / f"{n}.jsonl") for n in SETS}


def chat_rows(records: list[dict], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Packed rows of the conversations that fit in `seq_len` (longer ones are dropped, not
    truncated, so every answer is trained to its end)."""
    tokens = chat.ChatTokens.from_tokenizer(tokenizer)
    examples = [chat.sft_example(r["messages"], tokenizer, tokens) for r in records]
    return chat.pack_examples([e for e in examples if len(e[0]) <= seq_len], seq_len)


def pair_arrays(pairs: list[dict], tokenizer, length: int) -> tuple[dict, list[str]]:
    """The pair batch of every pair whose two sides fit in `length` (strictly, so the last
    real token is never cut), and the corruption kind of each kept pair."""
    batch = chat.preference_batch(pairs, tokenizer, length)
    keep = (batch["chosen_mask"][:, -1] == 0) & (batch["rejected_mask"][:, -1] == 0)
    return {k: v[keep] for k, v in batch.items()}, [p["kind"] for p, k in zip(pairs, keep) if k]


def prompts_of(records: list[dict], tokenizer, max_prompt_len: int) -> tuple[list, list[dict]]:
    """(prompt ids, the records) of the SFT records whose prompt fits `max_prompt_len`."""
    tokens = chat.ChatTokens.from_tokenizer(tokenizer)
    out, kept = [], []
    for r in records:
        ids = chat.render_prompt(r["messages"], tokenizer, tokens)
        if len(ids) <= max_prompt_len:
            out.append(ids)
            kept.append(r)
    return out, kept
