"""The value model: a scalar head on a causal backbone, trained with FSDP2 (the PPO critic, and
the reward model that reward-model training trains)."""
