"""rl_toolkit: Ray-orchestrated post-training for language models."""
