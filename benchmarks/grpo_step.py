"""GRPO step throughput: rl_toolkit's GRPO step side by side with TRL's GRPOTrainer.

    uv run --group benchmark python benchmarks/grpo_step.py            # 2-core CPU preset
    uv run --group benchmark python benchmarks/grpo_step.py --preset gpu

One step, in both frameworks: sample G completions of each of the step's prompts with
transformers on the policy's own weights (temperature 1, no top-k or top-p, at most
`max_new_tokens` new tokens, EOS ends a completion) -> score them with the same cheap
deterministic Python reward (`even_word_reward`) -> group advantages (r - mean) / (std + eps) ->
one optimizer step on the clipped policy-gradient loss over all P x G completions. Both start
from the same randomly initialised Llama-architecture model (harness.write_model_dir) and take
the same prompts in the same order, for `--warmup-steps` untimed steps and then `--steps` timed
ones. Each framework runs in its own subprocess, alternating over `--rounds` rounds; the figures
are the medians over rounds, the ratios the medians of the per-round ratios (harness.py).

rl_toolkit runs the recipe's own functions (`algorithms.grpo.sample_rollout` and
`train_on_rollout`) on the plain `PolicyWorker` in this process (world size 1, no Ray actors; the
recipe module imports Ray, so the process loads it): generation is the worker's `generate`
(weights gathered, sdpa, seeded sampler, KV cache), then `worker.train(batch,
ClippedPGLossFn(cfg), micro_batches)` on packed, padding-free micro-batches with varlen
attention. The reward runs in this process (`InProcessReward`), as TRL runs it, instead of in the
recipe's pool of scoring processes. TRL runs `GRPOTrainer` with transformers' `generate` (its
default generation path, not vLLM) and one padded forward of the whole batch.

The settings, rl_toolkit <-> TRL:
    grpo.num_prompts_per_step P          <-> per_device_train_batch_size = P * G (rows, not
                                             prompts), gradient_accumulation_steps 1 and
                                             steps_per_generation 1: one generation batch of P
                                             prompts x G per optimizer step
    grpo.num_generations_per_prompt G    <-> num_generations G
    policy.generation.max_new_tokens     <-> max_completion_length
    temperature 1, top_p 1, top_k 0      <-> temperature 1, top_p 1, top_k 0
    grpo.adv_estimator grpo (eps 1e-6)   <-> scale_rewards "group" (eps 1e-4)
    loss_fn.policy_loss ppo_clip, ratio_clip_min/max 0.2
                                         <-> epsilon 0.2 (epsilon_high defaults to it)
    loss_fn.aggregation token_mean       <-> loss_type "dapo" (a token sum over the global
                                             batch divided by its completion tokens)
    loss_fn.reference_policy_kl_penalty 0 <-> beta 0: no reference model on either side
    one optimizer step per rollout       <-> num_iterations 1: the ratio's denominator is the
                                             current log-probs detached on both sides
    grpo.overlong_filtering false,       <-> mask_truncated_completions False, shuffle_dataset
    dynamic_sampling off                     False (prompts in order)
    entropy_coef 0                       <-> entropy_coef 0 (TRL's training forward computes
                                             the per-token entropy anyway, for its metrics)
    AdamW lr 1e-5, no weight decay, fused, constant schedule, clipping at 1.0, no activation
    checkpointing, float32 on CPU; on GPU rl_toolkit's bf16 (fp32 master weights) and TRL's
    `bf16=True` autocast on fp32 weights (TRL's `generate` runs outside autocast, in fp32).

Rollout tokens per step: the completion tokens each framework generated (EOS included), counted
from its own output (rl_toolkit: the rollout's `token_mask`; TRL: the `completion_ids` its
reward function receives); tokens/s divides them by the wall time of the whole step
(generation, reward, advantages and training). Peak memory: the subprocess's peak RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU. MFU (GPU only): `8 * num_params * rollout tokens /
time / peak_flops` (2 to generate a token, 6 to train on it; prompt tokens and attention not
counted, so it understates the work).
"""

import math
from typing import Any

import numpy as np
import torch
from harness import (
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

# Model and prompts per device: the models of generation_throughput.py. Prompt lengths are
# log-normal with median max_prompt / 5, clipped to [4, max_prompt]; max_prompt +
# max_new_tokens <= max_length, so nothing is truncated.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": MODELS["cpu"],
        "max_length": 128,
        "max_prompt": 64,
        "prompts_per_step": 4,
        "group_size": 8,
        "max_new_tokens": 48,
        "micro_batch": {"unit": "tokens", "train": 2048, "logprob": 4096},
        "warmup_steps": 1,
        "steps": 3,
        "rounds": 3,
    },
    "gpu": {
        "model": MODELS["gpu"],
        "max_length": 768,
        "max_prompt": 256,
        "prompts_per_step": 16,
        "group_size": 8,
        "max_new_tokens": 512,
        "micro_batch": {"unit": "tokens", "train": 16384, "logprob": 32768},
        "warmup_steps": 1,
        "steps": 3,
        "rounds": 2,
    },
}
LEARNING_RATE = 1.0e-5
MAX_GRAD_NORM = 1.0
CLIP_EPSILON = 0.2


# ---------------------------------------------------------------------------------------------
# Shared inputs: prompts and the reward


def make_prompts(num_prompts: int, max_prompt: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token-id prompts with log-normal, long-tailed lengths (no EOS inside)."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=math.log(max_prompt / 5), sigma=0.75, size=num_prompts)
    lengths = np.clip(np.round(raw), 4, max_prompt).astype(int)
    return [rng.integers(FIRST_WORD_ID, vocab_size, size=n).tolist() for n in lengths]


def even_word_reward(completions: list[str], **_: Any) -> list[float]:
    """The share of a completion's words whose token id is even (0.0 for an empty one).

    Both frameworks call it on the decoded completions (special tokens removed), so the rewards,
    and with them the advantages, come from the same function of the same kind of input.
    """
    rewards = []
    for completion in completions:
        ids = [int(word.removeprefix("w")) for word in completion.split()]
        rewards.append(sum(i % 2 == 0 for i in ids) / len(ids) if ids else 0.0)
    return rewards


class InProcessReward:
    """`even_word_reward` as rl_toolkit's Environment, scored in this process."""

    def score(
        self, prompts: list[Any], completions: list[str], metadata: list[dict[str, Any]]
    ) -> Any:
        from rl_toolkit.environments import EnvironmentResult

        return EnvironmentResult(rewards=even_word_reward(completions), metrics={})


# ---------------------------------------------------------------------------------------------
# One framework in this process


def rl_toolkit_config(
    args: dict[str, Any],
    attn_implementation: str,
    mb_tokens: int | None,
    lora: dict[str, Any] | None,
) -> dict[str, Any]:
    """configs/grpo_tiny.yaml with the benchmark's model, batch, loss and sampling settings."""
    from rl_toolkit.utils.config import load_config

    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml")
    rows = args["prompts_per_step"] * args["group_size"]
    cfg["grpo"] |= {
        "num_prompts_per_step": args["prompts_per_step"],
        "num_generations_per_prompt": args["group_size"],
        "adv_estimator": "grpo",
        "dynamic_sampling": {"enabled": False, "max_gen_batches": 1},
        "overlong_filtering": False,
        "seed": SEED,
    }
    cfg["loss_fn"] |= {
        "policy_loss": "ppo_clip",
        "ratio_level": "token",
        "ratio_clip_min": CLIP_EPSILON,
        "ratio_clip_max": CLIP_EPSILON,
        "ratio_clip_c": None,
        "reference_policy_kl_penalty": 0.0,
        "aggregation": "token_mean",
        "importance_correction": "none",
        "entropy_coef": 0.0,
    }
    policy_config(
        cfg["policy"], args, attn_implementation, mb_tokens, lora,
        train_global_batch_size=rows, max_grad_norm=MAX_GRAD_NORM,
    )  # fmt: skip
    return cfg


def policy_config(
    policy_cfg: dict[str, Any],
    args: dict[str, Any],
    attn_implementation: str,
    mb_tokens: int | None,
    lora: dict[str, Any] | None,
    *,
    train_global_batch_size: int,
    max_grad_norm: float | None,
) -> dict[str, Any]:
    """The policy section (updated in place) of an RL benchmark: the preset's model, batch and
    sampling settings, a constant learning rate (ppo_step.py uses it too)."""
    policy_cfg |= {
        "model_name": args["model_dir"],
        "random_init": False,
        "precision": "bfloat16" if torch.cuda.is_available() else "float32",
        "seed": SEED,
        "train_global_batch_size": train_global_batch_size,
        "micro_batch": dict(args["micro_batch"]),
        "max_total_sequence_length": args["max_length"],
        "max_grad_norm": max_grad_norm,
        "attn_implementation": attn_implementation,
        "lora": lora,
        "scheduler": [
            {
                "name": "torch.optim.lr_scheduler.ConstantLR",
                "kwargs": {"factor": 1.0, "total_iters": 0},
            }
        ],
    }
    policy_cfg["generation"] |= {
        "backend": "hf",
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": args["max_new_tokens"],
        "stop_token_ids": [],
    }
    policy_cfg["tokenizer"]["name"] = args["model_dir"]
    if mb_tokens is not None:
        policy_cfg["micro_batch"] |= {"train": mb_tokens, "logprob": mb_tokens}
    policy_cfg["optimizer"]["kwargs"] |= {"lr": LEARNING_RATE, "weight_decay": 0.0}
    policy_cfg["fsdp"]["activation_checkpointing"] = args["activation_checkpointing"]
    return policy_cfg


def run_rl_toolkit(
    args: dict[str, Any],
    prompts: list[list[int]],
    attn_implementation: str,
    mb_tokens: int | None,
    lora: dict[str, Any] | None,
) -> tuple[list[tuple[float, float]], list[int]]:
    """GRPO steps with the recipe's functions on the plain PolicyWorker; step times and rollout
    tokens per step. ``mb_tokens`` replaces both token budgets of the preset when given; ``lora``
    is policy.lora."""
    from transformers import AutoTokenizer

    from rl_toolkit.algorithms.grpo import sample_rollout, train_on_rollout
    from rl_toolkit.algorithms.loss_functions import ClippedPGLossFn
    from rl_toolkit.data import prompt_collate_fn
    from rl_toolkit.models.policy.worker import PolicyWorker
    from rl_toolkit.utils.timer import Timer

    cfg = rl_toolkit_config(args, attn_implementation, mb_tokens, lora)
    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    worker = PolicyWorker(
        config=cfg["policy"], tokenizer=tokenizer, init_optimizer=True, init_reference_model=False
    )
    loss_fn, environment, timer = ClippedPGLossFn(cfg["loss_fn"]), InProcessReward(), Timer()
    size = args["prompts_per_step"]
    items = [
        {"prompt_id": index, "input_ids": torch.tensor(ids), "prompt": text(ids), "metadata": {}}
        for index, ids in enumerate(prompts)
    ]
    batches = iter(
        prompt_collate_fn(items[start : start + size], pad_token_id=PAD_ID)
        for start in range(0, len(items), size)
    )
    clock, tokens = StepClock(), []
    for step in range(len(prompts) // size):
        sampled = sample_rollout(
            worker, environment, lambda: next(batches, None), tokenizer, cfg["grpo"], step
        )
        assert sampled is not None, "a step without prompts"
        rollout, _ = sampled
        train_on_rollout(worker, rollout, loss_fn, cfg, timer)
        clock.lap()
        tokens.append(int(rollout["token_mask"].sum()))
    worker.shutdown()
    return clock.laps, tokens


def run_trl(
    args: dict[str, Any], prompts: list[list[int]]
) -> tuple[list[tuple[float, float]], list[int]]:
    """GRPO steps with TRL's GRPOTrainer; step times and rollout tokens per step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    # GRPOTrainer tokenises each prompt with `processing_class(text=...)` when it generates.
    first = tokenizer(text=text(prompts[0]))["input_ids"]
    assert first == prompts[0], "TRL would tokenise the prompts differently"
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": text(ids)} for ids in prompts])
    group_size = args["group_size"]
    config = GRPOConfig(
        **trl_common_args(
            args, learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM, seed=SEED
        ),
        per_device_train_batch_size=args["prompts_per_step"] * group_size,  # completions
        max_steps=len(prompts) // args["prompts_per_step"],
        num_generations=group_size,
        max_completion_length=args["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        epsilon=CLIP_EPSILON,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        shuffle_dataset=False,
        disable_dropout=True,
    )
    generated: list[int] = []
    seen_prompts: list[str] = []

    def reward(
        prompts: list[str], completions: list[str], completion_ids: list[list[int]], **_: Any
    ) -> list[float]:
        generated.append(sum(len(ids) for ids in completion_ids))  # EOS included
        seen_prompts.extend(prompts)
        return even_word_reward(completions)

    timer = trl_step_timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    timer.clock = StepClock()
    trainer.train()
    # Each step took the next prompts_per_step prompts, each G times, as rl_toolkit's steps do.
    expected = [text(ids) for ids in prompts for _ in range(group_size)]
    assert seen_prompts == expected, "TRL's steps took other prompts than rl_toolkit's"
    return timer.clock.laps, generated


def child_main(framework: str, args: dict[str, Any]) -> None:
    """Run one framework and print its RESULT line (harness.print_result)."""
    num_prompts = (args["warmup_steps"] + args["steps"]) * args["prompts_per_step"]
    prompts = make_prompts(num_prompts, args["max_prompt"], args["model"]["vocab_size"], SEED)
    if framework == "trl":
        times, tokens = run_trl(args, prompts)
    else:
        attn_implementation, mb_tokens, lora = parse_rl_toolkit_run(framework)
        times, tokens = run_rl_toolkit(args, prompts, attn_implementation, mb_tokens, lora)
    print_result(times, tokens)


if __name__ == "__main__":
    main(__file__, PRESETS, child_main, __doc__, flops_per_param=8)
