"""nanoGPT's character-level Shakespeare "baby GPT" recipe (Karpathy's train_shakespeare_char).

6 layers, 6 heads, width 384, context 256, batch 64, dropout 0.2 (residuals, embeddings and
attention probabilities, as nanoGPT's model), lr 1e-3
with 100 warmup steps and cosine decay to 1e-4 over 5000 steps, beta2 0.99.
nanoGPT reports a validation loss of about 1.47 for it.

Data as nanoGPT splits it: the validation split is the contiguous last 10% of the text
(`val_tail=0.1`, data/sources.py), not hashed chunks. Numerics are this project's fast
path rather than nanoGPT's choices, the model and data being the same: bf16 compute with
float32 parameters and Adam moments, and the "auto" attention, norm and decoding kernels
(the GPU kernels on a GPU, the reference code elsewhere; the attention of training steps is
the reference, the only one that drops probabilities). The validation split is about
111k characters, 7 batches of 64 x 256, so `eval_batches=32` scores all of it at every
evaluation (nanoGPT samples 200 random batches instead). Wall time to nanoGPT's loss on
one H200: BENCHMARKS.md, "Speed round two".
"""

from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_fields


def get_config() -> ConfigDict:
    c = base_config()
    c.model = model_fields(
        "tiny",
        vocab_size=128,
        d_model=384,
        n_layers=6,
        n_heads=6,
        d_ff=1536,
        max_len=256,
        dropout_rate=0.2,
        attention_dropout=0.2,  # nanoGPT drops attention probabilities at the same rate
        use_bias=False,
        dtype="bfloat16",
    )
    c.data.corpus = "text:../shared/data/tinyshakespeare.txt:val_tail=0.1"
    c.data.tokenizer = "char"
    c.data.vocab_size = 128
    c.data.seq_len = 256
    c.train.global_batch_size = 64
    c.train.num_steps = 5000
    c.train.eval_every = 250
    c.train.eval_batches = 32
    c.train.checkpoint_every = 500
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.end_lr = 1e-4
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.1
    c.sample.prompt = "\n"
    c.sample.max_new_tokens = 500
    return c
