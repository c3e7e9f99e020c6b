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
from rlhf.rollout import prompt_batch

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
            num_package_files=dc.package_files,
        )
        for name in SETS:
            stdlib_tasks.write_jsonl(directory / f"{name}.jsonl", data[name])
    return {n: stdlib_tasks.read_jsonl(directory / f"{n}.jsonl") for n in SETS}


def chat_rows(
    records: list[dict], tokenizer: chat.Tokenizer, seq_len: int
) -> dict[str, np.ndarray]:
    """Packed rows of the conversations that fit in `seq_len` (longer ones are dropped, not
    truncated, so every answer is trained to its end)."""
    tokens = chat.ChatTokens.from_tokenizer(tokenizer)
    examples = [chat.sft_example(r["messages"], tokenizer, tokens) for r in records]
    return chat.pack_examples([e for e in examples if len(e[0]) <= seq_len], seq_len)


def pair_arrays(
    pairs: list[dict], tokenizer: chat.Tokenizer, length: int
) -> tuple[dict, list[str]]:
    """The pair batch of every pair whose two sides fit in `length` (strictly, so the last
    real token is never cut), and the corruption kind of each kept pair."""
    batch = chat.preference_batch(pairs, tokenizer, length)
    keep = (batch["chosen_mask"][:, -1] == 0) & (batch["rejected_mask"][:, -1] == 0)
    return {k: v[keep] for k, v in batch.items()}, [p["kind"] for p, k in zip(pairs, keep) if k]


def prompts_of(
    records: list[dict], tokenizer: chat.Tokenizer, max_prompt_len: int
) -> tuple[list, list[dict]]:
    """(prompt ids, the records) of the SFT records whose prompt fits `max_prompt_len`."""
    tokens = chat.ChatTokens.from_tokenizer(tokenizer)
    out, kept = [], []
    for r in records:
        ids = chat.render_prompt(r["messages"], tokenizer, tokens)
        if len(ids) <= max_prompt_len:
            out.append(ids)
            kept.append(r)
    return out, kept


class PromptBatches:
    """Prompts for the RL stages (PPO, GRPO): iteration k's prompts depend on (seed, k)
    alone, so a resumed run draws the same. Each prompt is repeated `group_size` times in
    consecutive rows (GRPO's groups; 1 for PPO). Each process gets its rows of the global
    batch; "index" says which prompt (of the list given) a row holds."""

    def __init__(
        self,
        prompts: list,
        num_prompts: int,
        length: int,
        pad_id: int,
        seed: int,
        group_size: int = 1,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(prompts) < num_prompts:
            raise ValueError(
                f"only {len(prompts)} prompts fit the stage's data.max_prompt_len for "
                f"{num_prompts} per step; lower train.global_batch_size or raise max_prompt_len"
            )
        rows = num_prompts * group_size
        if rows % process_count:
            raise ValueError(f"{rows} rows per step do not split over {process_count} processes")
        self.prompts, self.num_prompts, self.length = prompts, num_prompts, length
        self.pad_id, self.seed, self.group_size = pad_id, seed, group_size
        per = rows // process_count
        self.rows = slice(process_index * per, (process_index + 1) * per)
        self.position = 0

    def __next__(self) -> dict:
        self.position += 1
        rng = np.random.default_rng([self.seed, self.position])
        chosen = rng.choice(len(self.prompts), self.num_prompts, replace=False)
        index = np.repeat(chosen, self.group_size).astype(np.int32)
        prompts_BP, lengths_B = prompt_batch(
            [self.prompts[i] for i in index], self.pad_id, self.length
        )
        return {
            "prompts": prompts_BP[self.rows],
            "lengths": lengths_B[self.rows],
            "index": index[self.rows],
        }

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
