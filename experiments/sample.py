"""Sampling from a trained (or imported) model.

`python -m experiments.sample --workdir=DIR --prompt="def " [--num_samples=4 --temperature=0.8]`
`python -m experiments.sample --workdir=DIR/grpo --chat --prompt="Write the Python function ..."`

DIR is any stage directory (DIR/pretrain, DIR/sft, DIR/ppo, ... or an imported model). With
`--chat` the prompt is a user's turn in the chat template post-training used (rlhf/chat.py),
and each answer runs to the assistant's `<|end|>`; `--chat` without `--prompt` holds a
conversation, one line of stdin a turn.
Only the parameters and the tokenizer stored beside them are read: no data is prepared, no
optimizer state restored, and nothing is written into DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
from absl import flags

from experiments import cli

DEFAULT_NEW_TOKENS = 128
cli.define_model_flags()
flags.DEFINE_string("prompt", "", "text to continue (with --chat: the user's message)")
flags.DEFINE_bool(
    "chat", False, "a post-trained model: --prompt as a chat turn, answer until <|end|>"
)
flags.DEFINE_string("system", "", "with --chat: a system message before the user's")
flags.DEFINE_integer("num_samples", 2, "how many continuations")
flags.DEFINE_integer(
    "max_new_tokens",
    None,
    f"tokens to generate at most (default: {DEFAULT_NEW_TOKENS}, or fewer if the model's "
    "learned positions end sooner)",
)
flags.DEFINE_float("temperature", 0.8, "0 means greedy")
flags.DEFINE_integer("top_k", 40, "0 disables top-k")
flags.DEFINE_float("top_p", 1.0, "1.0 disables nucleus sampling")
flags.DEFINE_integer("seed", 0, "sampling seed")
FLAGS = flags.FLAGS


def run() -> None:
    from model.sampling import fitting_new_tokens, make_sampler, sample_texts
    from model.transformer import LanguageModel
    from rlhf.chat import render_prompt
    from train import sharding
    from train.saved_model import load_model

    if FLAGS.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
    if FLAGS.max_new_tokens is not None and FLAGS.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")
    loaded = load_model(Path(FLAGS.workdir), which=FLAGS.checkpoint)
    tokenizer, mesh = loaded.tokenizer, sharding.make_mesh(sharding.MeshConfig())
    if FLAGS.chat:
        tokens = _chat_tokens(tokenizer, loaded.meta.get("stage"))
        if not FLAGS.prompt:
            return _converse(loaded, mesh, tokens)
        prompt = render_prompt(_system() + [_user(FLAGS.prompt)], tokenizer, tokens).tolist()
        stop_id, prompt_tokens = tokens.end, len(prompt)
    else:
        prompt, stop_id = FLAGS.prompt, tokenizer.eos_id
        prompt_tokens = 1 + len(tokenizer.encode(prompt))
    new_tokens = FLAGS.max_new_tokens or fitting_new_tokens(
        loaded.cfg, prompt_tokens, DEFAULT_NEW_TOKENS
    )
    with sharding.mesh_context(mesh):
        texts = sample_texts(
            make_sampler(LanguageModel(loaded.cfg), _sampling(new_tokens, stop_id, tokenizer)),
            loaded.params,
            tokenizer,
            [prompt] * FLAGS.num_samples,
            jax.random.key(FLAGS.seed),
            stop_id,
        )
    print(f"checkpoint step {loaded.step}")
    for i, text in enumerate(texts):
        if FLAGS.chat:
            print(f"--- answer {i} ---\n{text}")
        else:
            print(f"--- sample {i} ---\n{FLAGS.prompt}{text}")


def _sampling(new_tokens: int, stop_id: int, tokenizer):
    from model.sampling import SamplingConfig

    return SamplingConfig(
        max_new_tokens=new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        eos_id=stop_id,
        pad_id=tokenizer.pad_id,
        vocab_size=tokenizer.vocab_size,
    )


def _system() -> list[dict]:
    return [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _chat_tokens(tokenizer, stage: str | None):
    """The template's tokens (rlhf/chat.py) of a model that post-training taught them."""
    from rlhf.chat import ChatTokens

    refusal = (
        f"{FLAGS.workdir} holds a {stage} model, never taught the chat template: --chat is "
        "for the post-trained stages (sft, ppo, grpo, dpo); drop it to continue text"
    )
    if stage in ("pretrain", "import"):
        raise ValueError(refusal)
    try:
        return ChatTokens.from_tokenizer(tokenizer)
    except KeyError:
        raise ValueError(refusal) from None


def _converse(loaded, mesh, tokens) -> None:
    """--chat without --prompt: a conversation, one line of stdin a turn, until an empty line
    or the end of input. The conversation so far is each answer's prompt; its oldest
    exchanges drop out when it would not fit the model's context with a whole answer."""
    from model.sampling import make_sampler, sample_texts
    from model.transformer import LanguageModel
    from rlhf.chat import render_prompt
    from train import sharding

    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    new_tokens = FLAGS.max_new_tokens or min(DEFAULT_NEW_TOKENS, cfg.max_len // 2)
    room = cfg.max_len - new_tokens
    if room < 8:
        raise ValueError(f"--max_new_tokens={new_tokens} leaves no room for a conversation")
    sampler = make_sampler(LanguageModel(cfg), _sampling(new_tokens, tokens.end, tokenizer))
    rng, turns = jax.random.key(FLAGS.seed), []
    print(f"checkpoint step {loaded.step}; one line a turn, an empty line ends", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        turns.append(_user(line.rstrip("\n")))
        ids = render_prompt(_system() + turns, tokenizer, tokens).tolist()
        while len(ids) > room and len(turns) > 1:
            turns = turns[2:]  # the oldest question and its answer
            ids = render_prompt(_system() + turns, tokenizer, tokens).tolist()
        if len(ids) > room:
            turns.pop()
            print(f"(that turn takes {len(ids)} tokens; the model has room for {room})")
            continue
        rng, key = jax.random.split(rng)
        # prompts padded to a multiple of 64 tokens: a compilation per size, not per turn
        width = min(-(-len(ids) // 64) * 64, room)
        with sharding.mesh_context(mesh):
            [answer] = sample_texts(
                sampler, loaded.params, tokenizer, [ids], key, tokens.end, width
            )
        print(f"model> {answer}", flush=True)
        turns.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    cli.main(run)
