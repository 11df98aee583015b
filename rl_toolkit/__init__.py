"""rl_toolkit: Ray-orchestrated post-training for language models."""

import warnings

# torchdata 0.11's StatefulDataLoader calls a deprecated torch API on every iterator it makes;
# the warning is about torchdata's internals, not anything a user can change.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
