"""Post-training: SFT, reward model, PPO, DPO and GRPO on the core in `model/` and `train/`.

chat          chat template on the tokenizer's special tokens, assistant-only weights, packing
chat_vocab    the chat tokens added to a model whose tokenizer lacks them (an import)
sequences     padded rows: positions/segments from a mask, last-token index, log-probs
sft_step      SFT = the pretraining step on chat batches
reward_model  trunk + scalar head, reward at the last real token, normalisation
reward_step   Bradley-Terry step with margin, accuracy, mean margin
dpo           DPO loss and step, reference log-probs
ppo           GAE, whitening, KL-penalised rewards, clipped losses, KL controller, PPO step
rollout       KV-cache sampler rollouts laid out for PPO
ppo_iteration one PPO iteration as a step of the loop (generate, score, update)
stdlib_tasks  the embedded SFT set and preference pairs mined with `ast`
datasets      the mined sets as chat rows, preference pairs and prompts
evaluation    generation over many prompts, held-out ground truth of a policy
stage         what every post-training stage does around its math: its directory, the
              model it starts from, its optimizer, the one loop (train/loop.py)
ground_truth  ground-truth rates with 95% intervals (ast only, never executed)
verifier      verifiable reward components and their weighted sum (ast + pyflakes)
grpo          group-normalised advantages, k3 KL, clipped loss (GRPO/DAPO/Dr. GRPO), step
"""
