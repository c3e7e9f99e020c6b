"""The default pipeline: pretrain on the standard library, then SFT, reward model, PPO and
DPO, small enough for a 2-core CPU (about 20 minutes end to end).

Every stage section (sft, reward, ppo, dpo) has the sub-sections of pretraining: data,
train, optim, mesh (experiments/configs/common.py), plus `algorithm` for its constants.
SFT, GRPO and DPO also have `lora`: `--config.sft.lora.rank=8` freezes the model and trains
rank-8 adapters instead (train/lora.py); rank 0, the default, trains every parameter.
"""

from ml_collections import ConfigDict

from experiments.configs import stdlib_tiny
from experiments.configs.common import lora_fields, stage_config


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.stages = "sft,reward,ppo,grpo,dpo"  # post-training stages, in order
    # A stage directory to start post-training from instead of pretraining (e.g. a model
    # imported with experiments.convert); "" pretrains first.
    c.init_from = ""
    c.pretrain = stdlib_tiny.get_config()
    c.pretrain.train.num_steps = 300
    c.pretrain.train.eval_every = 150
    c.pretrain.train.checkpoint_every = 150
    c.pretrain.sample.num_samples = 0
    # Post-training starts from the pretraining checkpoint with the lowest eval loss
    # ("latest": the newest); small corpora overfit (BENCHMARKS.md, GPU pipeline).
    c.pretrain_checkpoint = "best"
    # Mined from the interpreter's own standard library; short functions, so that prompt
    # and answer fit the tiny model's context. package_files > 0 mines that many files of
    # the installed packages for more training tasks (evaluation stays on the stdlib).
    c.posttrain_data = ConfigDict(
        dict(root="", eval_fraction=0.1, max_files=0, max_chars=400, package_files=0)
    )
    # Pretraining leaves out the files whose functions the evaluation asks for.
    c.pretrain.data.corpus = "stdlib:holdout=0.1"
    no_decay = dict(schedule="cosine", weight_decay=0.0, clip_norm=1.0)
    c.sft = stage_config(
        data=dict(seq_len=256, eval_rows=64),
        train=dict(
            global_batch_size=16, num_steps=120, log_every=20, eval_every=60, checkpoint_every=40
        ),
        optim=dict(lr=1e-3, end_lr=1e-4, warmup_steps=10, **no_decay),
    )
    # LoRA (rank 0: off): adapters on the attention and MLP kernels, scaled by alpha / rank;
    # targets are groups (attention, mlp) or kernel names (query, key, value, out, gate, up,
    # down). Adapters train well at a learning rate about 10x a full fine-tune's.
    c.sft.lora = lora_fields(rank=0, alpha=16.0, targets="attention,mlp")
    c.reward = stage_config(
        data=dict(seq_len=256, normalization_samples=64),
        train=dict(
            global_batch_size=16,
            num_steps=100,
            log_every=20,
            eval_every=50,
            checkpoint_every=25,
            keep_best=0,
        ),
        optim=dict(lr=3e-4, end_lr=3e-5, warmup_steps=10, **no_decay),
        algorithm=dict(margin=0.0),  # a fixed Bradley-Terry margin (0: plain BT)
    )
    c.ppo = stage_config(
        # global_batch_size: prompts per iteration; num_steps: iterations.
        data=dict(max_prompt_len=100, max_new_tokens=100),
        train=dict(
            global_batch_size=16,
            num_steps=20,
            log_every=5,
            eval_every=20,
            checkpoint_every=5,
            keep_best=0,
        ),
        optim=dict(lr=3e-5, end_lr=3e-6, warmup_steps=0, **no_decay),
        algorithm=dict(
            temperature=1.0,  # sampling temperature; log-probs are recomputed at it
            gamma=1.0,  # discount
            lam=0.95,  # GAE lambda
            clip_eps=0.2,  # policy ratio clip
            value_clip=0.2,  # value clip around the rollout's values
            vf_coef=0.1,  # value loss weight
            epochs=2,  # passes over each rollout batch
            num_minibatches=2,  # optimizer updates per epoch
            whiten_advantages=True,
            missing_eos_penalty=1.0,  # subtracted from the score of a response without EOS
            kl_coef=0.05,  # initial KL coefficient beta
            kl_target=6.0,  # adaptive controller's target KL (0: fixed beta)
            kl_horizon=10_000,  # adaptive controller's horizon
        ),
    )
    c.grpo = stage_config(
        # global_batch_size: prompts per iteration (each sampled group_size times).
        data=dict(max_prompt_len=100, max_new_tokens=100),
        train=dict(
            global_batch_size=4,
            num_steps=20,
            log_every=5,
            eval_every=20,
            checkpoint_every=5,
            keep_best=0,
        ),
        optim=dict(lr=2e-5, end_lr=2e-6, warmup_steps=0, **no_decay),
        algorithm=dict(
            group_size=4,  # G answers per prompt
            temperature=1.0,
            clip_eps_low=0.2,
            clip_eps_high=0.2,  # DAPO: 0.28
            kl_beta=0.04,  # k3 KL to the SFT model; 0 skips the reference pass
            std_normalize=True,  # False: Dr. GRPO
            loss_normalization="sequence",  # sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)
            epochs=1,
            num_minibatches=1,
            missing_eos_penalty=1.0,  # subtracted from the reward of an answer cut off
            # The verifiable reward (rlhf/verifier.py): 0 unless it parses, else these.
            reward_weights=dict(
                parses=0.1,
                defines_name=0.2,
                signature=0.2,
                nontrivial=0.15,
                no_undefined_names=0.15,
                similarity=0.2,
            ),
        ),
    )
    c.grpo.lora = lora_fields()
    c.dpo = stage_config(
        data=dict(seq_len=256),
        train=dict(
            global_batch_size=16,
            num_steps=40,
            log_every=10,
            eval_every=40,
            checkpoint_every=10,
            keep_best=0,
        ),
        optim=dict(lr=5e-5, end_lr=5e-6, warmup_steps=5, **no_decay),
        # label_smoothing > 0: conservative DPO; nll_weight > 0: RPO (DPO + the chosen
        # answers' NLL), which keeps DPO from lowering the ground truth (rlhf/dpo.py)
        algorithm=dict(beta=0.1, label_smoothing=0.0, nll_weight=1.0),
    )
    c.dpo.lora = lora_fields()
    # Held-out ground truth: greedy answers to the first num_prompts held-out prompts.
    c.eval = ConfigDict(
        dict(num_prompts=64, temperature=0.0, max_prompt_len=100, max_new_tokens=100, batch_size=16)
    )
    return c
