"""The policy: the driver-side facade (``lm_policy.Policy``) and the FSDP2 workers.

Its config schema (``PolicyConfig``) is in ``rl_toolkit.config_schema``.
"""
