"""Supervised fine-tuning is the pretraining step on chat batches.

Nothing differs but the data: `rlhf.chat.sft_example` gives weight 0 to
everything but assistant tokens and `rlhf.chat.pack_examples` packs examples
with segment ids, in the same batch format. So SFT compiles
`train.pretrain_step.make_pretrain_step` unchanged; this alias only names it.
"""

from __future__ import annotations

from train.pretrain_step import StepConfig, make_pretrain_step

make_sft_step = make_pretrain_step

__all__ = ["StepConfig", "make_sft_step"]
