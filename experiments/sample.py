"""Sampling from a trained (or imported) model.

`python -m experiments.sample --workdir=DIR --prompt="def " [--num_samples=4 --temperature=0.8]`
`python -m experiments.sample --workdir=DIR/grpo --chat --prompt="Write the Python function ..."`

DIR is any stage directory (DIR/pretrain, DIR/sft, DIR/ppo, ... or an imported model). With
`--chat` the prompt is a user's turn in the chat template post-training used (rlhf/chat.py),
and each answer runs to the assistant's `<|end|>`.
Only the parameters and the tokenizer stored beside them are read: no data is prepared, no
optimizer state restored, and nothing is written into DIR.
"""

from __future__ import annotations

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
    from model.sampling import SamplingConfig, fitting_new_tokens, make_sampler, sample_texts
    from model.transformer import LanguageModel
    from train import sharding
    from train.checkpoint import load_model

    if FLAGS.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
    loaded = load_model(Path(FLAGS.workdir), which=FLAGS.checkpoint)
    tokenizer, mesh = loaded.tokenizer, sharding.make_mesh(sharding.MeshConfig())
    if FLAGS.chat:
        prompt, stop_id = _chat_prompt(tokenizer, loaded.meta.get("stage"))
        prompt_tokens = len(prompt)
    else:
        prompt, stop_id = FLAGS.prompt, tokenizer.eos_id
        prompt_tokens = 1 + len(tokenizer.encode(prompt))
    sampling = SamplingConfig(
        max_new_tokens=FLAGS.max_new_tokens
        or fitting_new_tokens(loaded.cfg, prompt_tokens, DEFAULT_NEW_TOKENS),
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        eos_id=stop_id,
        pad_id=tokenizer.pad_id,
        vocab_size=tokenizer.vocab_size,
    )
    with sharding.mesh_context(mesh):
        texts = sample_texts(
            make_sampler(LanguageModel(loaded.cfg), sampling),
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


def _chat_prompt(tokenizer, stage: str | None) -> tuple[list[int], int]:
    """(ids of --system and --prompt as a conversation up to the assistant's turn, the
    token that ends the answer), in the template post-training used (rlhf/chat.py)."""
    from rlhf.chat import ChatTokens, render_prompt

    refusal = (
        f"{FLAGS.workdir} holds a {stage} model, never taught the chat template: --chat is "
        "for the post-trained stages (sft, ppo, grpo, dpo); drop it to continue text"
    )
    if stage in ("pretrain", "import"):
        raise ValueError(refusal)
    try:
        tokens = ChatTokens.from_tokenizer(tokenizer)
    except KeyError:
        raise ValueError(refusal) from None
    messages = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    messages.append({"role": "user", "content": FLAGS.prompt})
    return render_prompt(messages, tokenizer, tokens).tolist(), tokens.end


if __name__ == "__main__":
    cli.main(run)
