"""The FSDP2 runtime every model role builds on (policy now; critic and reward model next).

Small functions with explicit arguments, in the manner of torchtitan, never a config dict:

    init.py         join the process group; the device mesh; collectives the roles share
    parallelize.py  apply_fsdp, apply_activation_checkpointing, resharding, local shards
    build.py        build a Hugging Face model on the meta device, shard it, fill it from rank 0
    checkpoint.py   sharded save/load (torch.distributed.checkpoint, read without pickle code)
                    and the Hugging Face export
    step.py         the optimizer step: global gradient norm, clipping, optimizer, scheduler

A role worker (rl_toolkit/models/policy/worker.py) composes these; it holds no FSDP plumbing.
"""
