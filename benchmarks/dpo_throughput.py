"""DPO training throughput: rl_toolkit side by side with TRL's DPOTrainer.

    uv run --group benchmark python benchmarks/dpo_throughput.py            # 2-core CPU preset
    uv run --group benchmark python benchmarks/dpo_throughput.py --preset gpu

Both frameworks train the same randomly initialised Llama-architecture model (same config, same
seed) on the same synthetic preference pairs, in the same order, with the same optimizer, lr,
beta, batch and maximum length, for `--warmup-steps` untimed steps and then `--steps` timed
steps. Each framework runs in its own subprocess (so peak memory is per framework), alternating
A B A B over `--rounds` rounds on a noisy machine; the figures are the median over rounds.
`--frameworks` adds runs of rl_toolkit with another attention implementation or token budget
(`rl_toolkit@sdpa:512`), or leaves TRL out where it is not installed.

rl_toolkit runs as the plain `PolicyWorker` in this process (world size 1, no Ray), which
is what a single-process TRL `DPOTrainer` is comparable with; it imports nothing of Ray, so it
also runs where Ray is not installed (a GPU box). Each step computes the reference log-probs of
the batch (as the recipe's `add_ref_logprobs_to_data` does) and then trains; TRL runs with
`precompute_ref_log_probs=False`, so its reference forward is inside each step as well. Both pass the prompt and the responses
through the reference model and the policy once per step; nothing is precomputed outside the
timed steps.

Training tokens per step: prompt + response tokens that are not padding, of the chosen and the
rejected sequence of every pair of the step (the prompt counts twice: it is in both sequences),
computed from the data for both frameworks. Peak memory: the subprocess's peak RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU. MFU (GPU only): `6 * num_params * tokens / time /
peak_flops`, with all parameters (embeddings and lm_head included), attention FLOPs not included.
The model, the clock, the rounds and the table are benchmarks/harness.py, shared with
sft_throughput.py.
"""

import math
from typing import Any

import numpy as np
import torch
from harness import (
    EOS_ID,
    FIRST_WORD_ID,
    MODELS,
    PAD_ID,
    REPO,
    SEED,
    StepClock,
    main,
    parse_rl_toolkit_run,
    print_result,
    text,
    trl_common_args,
    trl_step_timer,
)

# Model and data per device. Lengths are log-normal with median max_part / 5 (long-tailed),
# clipped to [min_len, max_part]; prompt + response never exceeds max_length, so nothing is
# truncated by either framework.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": MODELS["cpu"],
        "max_length": 256,
        "pairs_per_step": 8,
        "micro_batch": {"unit": "tokens", "train": 2048, "logprob": 4096},
        "warmup_steps": 1,
        "steps": 4,
        "rounds": 3,
    },
    "gpu": {
        "model": MODELS["gpu"],
        "max_length": 2048,
        "pairs_per_step": 16,
        "micro_batch": {"unit": "tokens", "train": 8192, "logprob": 16384},
        "warmup_steps": 3,
        "steps": 10,
        "rounds": 2,
    },
}
LEARNING_RATE = 1.0e-5
BETA = 0.1
MAX_GRAD_NORM = 1.0


# ---------------------------------------------------------------------------------------------
# Shared inputs: model config, tokenizer, preference pairs


def make_pairs(
    num_pairs: int, max_length: int, vocab_size: int, seed: int
) -> list[dict[str, list[int]]]:
    """Synthetic preference pairs with log-normal, long-tailed lengths.

    Returns:
        ``num_pairs`` dicts of token-id lists: ``prompt``, ``chosen`` and ``rejected`` (each
        response ends with EOS); ``len(prompt) + len(response) <= max_length``.
    """
    rng = np.random.default_rng(seed)
    max_part = max_length // 2

    def lengths(minimum: int) -> np.ndarray:
        raw = rng.lognormal(mean=math.log(max_part / 5), sigma=0.75, size=num_pairs)
        return np.clip(np.round(raw), minimum, max_part).astype(int)

    prompt_lens, chosen_lens, rejected_lens = lengths(4), lengths(2), lengths(2)
    pairs = []
    for p_len, c_len, r_len in zip(prompt_lens, chosen_lens, rejected_lens, strict=True):
        words = rng.integers(FIRST_WORD_ID, vocab_size, size=p_len + c_len + r_len).tolist()
        pairs.append(
            {
                "prompt": words[:p_len],
                "chosen": words[p_len : p_len + c_len - 1] + [EOS_ID],
                "rejected": words[p_len + c_len : p_len + c_len + r_len - 1] + [EOS_ID],
            }
        )
    return pairs


def tokens_per_step(pairs: list[dict[str, list[int]]], pairs_per_step: int) -> list[int]:
    """Non-padding tokens of each step: prompt + chosen and prompt + rejected of every pair."""
    per_pair = [2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs]
    return [
        sum(per_pair[start : start + pairs_per_step])
        for start in range(0, len(pairs), pairs_per_step)
    ]


# ---------------------------------------------------------------------------------------------
# One framework in this process


def run_rl_toolkit(
    args: dict[str, Any],
    pairs: list[dict[str, list[int]]],
    attn_implementation: str,
    mb_tokens: int | None,
    lora: dict[str, Any] | None,
) -> list[float]:
    """Train with the plain PolicyWorker; return the wall time of every step.

    ``mb_tokens`` replaces both token budgets of the preset when given; ``lora`` is
    ``policy.lora`` (None: full fine-tuning, with a host copy of the reference weights).
    """
    from transformers import AutoTokenizer

    from rl_toolkit.algorithms.loss_functions import DPOLossFn
    from rl_toolkit.config_schema import micro_batches
    from rl_toolkit.data.collate import preference_collate_fn
    from rl_toolkit.models.policy.worker import PolicyWorker
    from rl_toolkit.utils.config import load_config

    cfg = load_config(REPO / "configs" / "dpo_tiny.yaml")
    policy_cfg, dpo_cfg = cfg["policy"], cfg["dpo"]
    rows = 2 * args["pairs_per_step"]
    policy_cfg |= {
        "model_name": args["model_dir"],
        "random_init": False,
        "precision": "bfloat16" if torch.cuda.is_available() else "float32",
        "seed": SEED,
        "train_global_batch_size": rows,
        "micro_batch": dict(args["micro_batch"]),
        "max_total_sequence_length": args["max_length"],
        "max_grad_norm": MAX_GRAD_NORM,
        "attn_implementation": attn_implementation,
        "lora": lora,
        "scheduler": [
            {
                "name": "torch.optim.lr_scheduler.ConstantLR",
                "kwargs": {"factor": 1.0, "total_iters": 0},
            }
        ],
    }
    policy_cfg["tokenizer"]["name"] = args["model_dir"]
    if mb_tokens is not None:
        policy_cfg["micro_batch"] |= {"train": mb_tokens, "logprob": mb_tokens}
    policy_cfg["optimizer"]["kwargs"] |= {"lr": LEARNING_RATE, "weight_decay": 0.0}
    policy_cfg["fsdp"]["activation_checkpointing"] = args["activation_checkpointing"]
    dpo_cfg |= {"reference_policy_kl_penalty": BETA, "reference_free": False}
    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    worker = PolicyWorker(
        config=policy_cfg, tokenizer=tokenizer, init_optimizer=True, init_reference_model=True
    )
    train_mbs = micro_batches(policy_cfg["micro_batch"], "train")
    logprob_mbs = micro_batches(policy_cfg["micro_batch"], "logprob")
    loss_fn = DPOLossFn(dpo_cfg)
    items = [
        {
            "pair_id": idx,
            "prompt_length": len(p["prompt"]),
            "chosen_input_ids": torch.tensor(p["prompt"] + p["chosen"]),
            "rejected_input_ids": torch.tensor(p["prompt"] + p["rejected"]),
        }
        for idx, p in enumerate(pairs)
    ]
    step = args["pairs_per_step"]
    batches = [
        preference_collate_fn(
            items[start : start + step], pad_token_id=PAD_ID, pad_to_multiple_of=8
        )
        for start in range(0, len(items), step)
    ]
    clock = StepClock()
    for batch in batches:
        # What the recipe's add_ref_logprobs_to_data does, without the recipe's Ray imports.
        reference = worker.reference_logprobs(batch, logprob_mbs, response_only=True)
        batch["reference_policy_logprobs"] = reference["reference_logprobs"]
        worker.train(batch, loss_fn, train_mbs)
        clock.lap()
    worker.shutdown()
    return clock.laps


def run_trl(args: dict[str, Any], pairs: list[dict[str, list[int]]]) -> list[float]:
    """Train with TRL's DPOTrainer; return the wall time of every step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    dataset = Dataset.from_list(
        [
            {
                "prompt": text(p["prompt"]),
                "chosen": " " + text(p["chosen"]),
                "rejected": " " + text(p["rejected"]),
            }
            for p in pairs
        ]
    )
    config = DPOConfig(
        **trl_common_args(
            args, learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM, seed=SEED
        ),
        beta=BETA,
        per_device_train_batch_size=args["pairs_per_step"],
        max_steps=len(pairs) // args["pairs_per_step"],
        max_length=args["max_length"],
        precompute_ref_log_probs=False,
    )
    timer = trl_step_timer()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] == pairs[0]["prompt"], "TRL tokenised the prompt differently"
    assert first["chosen_ids"] == pairs[0]["chosen"], "TRL tokenised the response differently"
    timer.clock = StepClock()
    trainer.train()
    return timer.clock.laps


def child_main(framework: str, args: dict[str, Any]) -> None:
    """Run one framework and print its RESULT line (harness.print_result)."""
    num_pairs = (args["warmup_steps"] + args["steps"]) * args["pairs_per_step"]
    pairs = make_pairs(num_pairs, args["max_length"], args["model"]["vocab_size"], SEED)
    if framework == "trl":
        times = run_trl(args, pairs)
    else:
        attn_implementation, mb_tokens, lora = parse_rl_toolkit_run(framework)
        times = run_rl_toolkit(args, pairs, attn_implementation, mb_tokens, lora)
    print_result(times, tokens_per_step(pairs, args["pairs_per_step"]))


if __name__ == "__main__":
    main(__file__, PRESETS, child_main, __doc__)
