"""Generation: the interface every backend implements, and the ``hf`` backend's sampler.

    interfaces.py        GenerationInterface (generate, prepare/finish, update_weights, shutdown)
    sampling.py          seeded token choice from logits: temperature, top-k, top-p, inverse CDF
    hf_sampling.py       the KV-cache loop on a Hugging Face causal LM (backend ``hf``)
    rollout.py           Responses, and the rollout batch built from prompts and responses
    vllm_worker.py       VllmWorker: one vLLM engine in its process (backend ``vllm``; the only
                         module that imports vLLM, an optional extra)
    vllm_generation.py   VllmGeneration: the driver side of the vLLM workers
    weight_sync.py       the policy's weights in buckets, and how a bucket travels (refit)

Backend ``hf`` is the policy itself: ``Policy.generate`` shards the prompts over the FSDP2
policy workers and each samples its rows (``PolicyWorker.generate``). Backend ``vllm`` is
``VllmGeneration``: vLLM engines with the policy's weights, refit after every update. The config
is ``policy.generation`` (``SamplingConfig`` in ``rl_toolkit.config_schema``).
"""
