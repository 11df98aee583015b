"""The reward model: a frozen sequence classifier that scores completions, as an Environment."""
