"""The default pipeline: pretrain on the standard library, SFT, reward model, PPO and DPO,
small enough for a 2-core CPU (about 20 minutes end to end)."""

from ml_collections import ConfigDict

from experiments.configs import stdlib_tiny


def get_config():
    c = ConfigDict()
    c.seed = 0
    c.pretrain = stdlib_tiny.get_config()
    c.pretrain.train.num_steps = 300
    c.pretrain.optim.total_steps = 300
    c.pretrain.train.eval_every = 150
    c.pretrain.train.checkpoint_every = 150
    c.pretrain.sample.num_samples = 0
    # Post-training starts from the pretraining checkpoint with the lowest eval loss
    # ("latest": the newest); small corpora overfit (BENCHMARKS.md, GPU pipeline).
    c.pretrain_checkpoint = "best"
    # Mined from the interpreter's own standard library; short functions, so that prompt
    # and answer fit the tiny model's context.
    c.posttrain_data = ConfigDict(dict(root="", eval_fraction=0.1, max_files=0, max_chars=400))
    # Pretraining leaves out the files whose functions the evaluation asks for.
    c.pretrain.data.corpus = "stdlib:holdout=0.1"
    c.sft = ConfigDict(
        dict(
            steps=120,
            batch_size=16,
            seq_len=256,
            lr=1e-3,
            warmup_steps=10,
            log_every=20,
            checkpoint_every=40,  # DIR/sft/resume/: an interrupted stage resumes from it
            eval_rows=64,
        )
    )
    c.reward = ConfigDict(
        dict(
            steps=100,
            batch_size=16,
            seq_len=256,
            lr=3e-4,
            warmup_steps=10,
            log_every=20,
            checkpoint_every=25,
            margin=0.0,
            normalization_samples=64,
        )
    )
    c.ppo = ConfigDict(
        dict(
            iterations=20,
            batch_size=16,
            max_prompt_len=100,
            max_new_tokens=100,
            temperature=1.0,
            lam=0.95,
            clip_eps=0.2,
            value_clip=0.2,
            vf_coef=0.1,
            epochs=2,
            num_minibatches=2,
            lr=3e-5,
            warmup_steps=0,
            kl_coef=0.05,
            kl_target=6.0,
            kl_horizon=10_000,
            missing_eos_penalty=1.0,
            log_every=5,
            checkpoint_every=5,  # iterations
        )
    )
    c.dpo = ConfigDict(
        dict(
            enabled=True,
            steps=40,
            batch_size=16,
            lr=5e-5,
            warmup_steps=5,
            beta=0.1,
            log_every=10,
            checkpoint_every=10,
        )
    )
    c.eval = ConfigDict(dict(num_prompts=64, temperature=0.0))  # greedy answers for the table
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c
