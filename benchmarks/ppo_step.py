"""PPO step throughput: rl_toolkit's PPO step side by side with TRL's PPOTrainer.

    uv run --group benchmark --with 'trl==1.12.0' python benchmarks/ppo_step.py   # 2-core CPU preset
    uv run --group benchmark --with 'trl==1.12.0' python benchmarks/ppo_step.py --preset gpu

TRL 1.16 (what the `benchmark` group locks) has no PPO trainer any more; TRL 1.12.0 still ships
`trl.experimental.ppo.PPOTrainer`, and it imports with the locked transformers. `--with
'trl==1.12.0'` lays it over the locked environment for this run only (uv.lock is not changed).
Without it the script stops with one line naming that command; `--frameworks rl_toolkit` runs
rl_toolkit alone.

One step, in both frameworks (RLHF PPO, Ziegler et al. 2019 / InstructGPT): sample one
completion of each of the step's P prompts with transformers on the policy's own weights
(temperature 1, no top-k or top-p, at most `max_new_tokens` new tokens, EOS ends a completion)
-> the reference policy's log-probs (the initial policy), the critic's values and the reward
model's score of every completion -> per-token rewards (the score at the last token, minus
0.05 * KL_k1 at every token) -> GAE advantages (gamma 1, lambda 0.95), whitened over the step's
tokens, and returns -> one optimizer step of the policy on the clipped policy-gradient loss and
one of the critic on the clipped value loss, over the whole rollout. Three models are read from
folders the driver writes once (harness.write_model_dir and `write_scalar_models`), the same for
both: the policy (a randomly initialised Llama), the value model (that backbone with a seeded
random one-output `score` head) and the reward model (the same with another head). They take
the same prompts in the same order, for `--warmup-steps` untimed steps and then `--steps` timed
ones; each framework runs in its own subprocess, alternating over `--rounds` rounds (harness.py).

rl_toolkit runs the recipe's own functions: `algorithms.grpo.sample_rollout` (as PPO's loop
calls it) and `algorithms.ppo.train_on_rollout` (values, reference log-probs, advantages, the
critic's and the policy's optimizer steps), on the plain workers in this process (world size 1,
no Ray actors; the recipe modules import Ray, so the process loads it): `PolicyWorker` (with its
reference weights), `ValueWorker` as the critic and `RewardModelWorker` scoring as the recipe's
`RewardModel` environment does (`InProcessRewardModel`: the prompt and completion text
re-tokenised with the reward model's tokenizer, EOS appended). TRL runs `PPOTrainer` with
transformers' `generate`, a deep copy of the policy as reference, and one padded forward of the
policy and value model together per optimizer step.

The settings, rl_toolkit <-> TRL:
    grpo.num_prompts_per_step P,            <-> per_device_train_batch_size P,
    num_generations_per_prompt 1                gradient_accumulation_steps 1 (one completion
                                                per prompt is all PPOTrainer samples)
    policy.generation.max_new_tokens        <-> response_length, stop_token "eos"
    temperature 1, top_p 1, top_k 0         <-> temperature 1 (+1e-7), top_p 1, top_k 0
    reference_policy_kl_penalty 0.05,       <-> kl_coef 0.05, kl_estimator "k1"
    kl_in_reward, kl_estimator k1
    ppo.gae_gamma 1.0, gae_lambda 0.95      <-> gamma 1.0, lam 0.95
    ppo.whiten_advantages true              <-> advantages always whitened; whiten_rewards False
    loss_fn ppo_clip 0.2, token_mean        <-> cliprange 0.2 (a token mean of the mini-batch)
    value_loss_fn.value_clip 0.2            <-> cliprange_value 0.2; both 0.5 * max(...)
    critic and policy: one pass, one        <-> num_ppo_epochs 1, num_mini_batches 1: one
    optimizer step each per rollout             optimizer step per rollout for both models
    (ppo.critic_epochs 1, both global
    batch sizes P)
    two AdamW, lr 1e-5 each, fused, no      <-> one AdamW (adamw_torch_fused) over policy and
    weight decay, constant schedule             value model, lr 1e-5, vf_coef 1.0: the two
                                                models share no parameter, so the updates are
                                                the same as two optimizers'
    max_grad_norm null (policy, critic)     <-> PPOTrainer never clips gradients
    float32 on CPU, no activation checkpointing, dropout off, on both.
What could not be made equal is in docs/benchmarks.md ("PPO step").

Rollout tokens per step: the completion tokens each framework generated (EOS included), counted
from its own data (rl_toolkit: the rollout's `token_mask`; TRL: the non-padding completion
positions of the batch its reward model scores); tokens/s divides them by the wall time of the
whole step (generation, reward model, reference, critic, advantages, both optimizer steps).
Peak memory: the subprocess's peak RSS on CPU, `torch.cuda.max_memory_allocated` on GPU. MFU
(GPU only): 20 FLOPs per parameter and rollout token (2 to generate, 2 each for the reference,
critic and reward forwards, 6 each to train policy and critic), every model counted at the
policy's size (the scalar-head models have no `lm_head`, so this overstates their share);
prompt tokens and attention are not counted.
"""

import os
from pathlib import Path
from typing import Any

import torch
from grpo_step import make_prompts, policy_config
from harness import (
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

# Model and prompts per device: grpo_step.py's models and prompt lengths (log-normal, median
# max_prompt / 5, clipped to [4, max_prompt]; max_prompt + max_new_tokens + 1 <= max_length, so
# nothing is truncated, not even the reward model's input with its EOS).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": MODELS["cpu"],
        "max_length": 128,
        "max_prompt": 64,
        "prompts_per_step": 16,
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
        "prompts_per_step": 64,
        "max_new_tokens": 512,
        "micro_batch": {"unit": "tokens", "train": 16384, "logprob": 32768},
        "warmup_steps": 1,
        "steps": 3,
        "rounds": 2,
    },
}
LEARNING_RATE = 1.0e-5  # the policy's and the critic's
CLIP_EPSILON = 0.2
VALUE_CLIP = 0.2
KL_COEF = 0.05
GAE_GAMMA, GAE_LAMBDA = 1.0, 0.95
TRL_COMMAND = "uv run --group benchmark --with 'trl==1.12.0' python benchmarks/ppo_step.py"


# ---------------------------------------------------------------------------------------------
# Shared inputs: the value and reward models


def write_scalar_models(args: dict[str, Any], folder: Path) -> None:
    """The value model and the reward model, written once for both frameworks: the policy's
    backbone with a one-output `score` head, seeded (SEED + 1, SEED + 2), and its tokenizer.

    Adds their folders to ``args`` as `value_dir` and `reward_dir`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights newly initialised": the heads, as intended
    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    for name, seed in (("value", SEED + 1), ("reward", SEED + 2)):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            args["model_dir"], num_labels=1, dtype=torch.float32
        )
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        args[f"{name}_dir"] = str(folder / name)


def check_framework(framework: str) -> None:
    """Stop with one line when TRL's PPOTrainer is not importable."""
    if framework != "trl":
        return
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its "APIs may change" warning
    try:
        import trl.experimental.ppo  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            f"ppo_step.py: TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12 and earlier) cannot "
            f"be imported ({error}); run: {TRL_COMMAND}"
        ) from None


# ---------------------------------------------------------------------------------------------
# rl_toolkit


class InProcessPolicy:
    """The Policy facade's calls of a PPO step, on one PolicyWorker in this process."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.generate = worker.generate
        self.train = worker.train

    def reference_logprobs(self, data: Any, micro_batches: Any) -> Any:
        return self.worker.reference_logprobs(data, micro_batches, response_only=True)


class InProcessRewardModel:
    """The recipe's RewardModel environment on one RewardModelWorker in this process: the same
    inputs (RewardModel's `reward_model_batch`) and micro-batches."""

    def __init__(self, config: dict[str, Any]) -> None:
        from rl_toolkit.models.reward.reward_model import reward_micro_batches
        from rl_toolkit.models.reward.worker import RewardModelWorker
        from rl_toolkit.utils.hf import get_tokenizer

        self.config = config
        self.worker = RewardModelWorker(config=config)
        self.tokenizer = get_tokenizer(config["tokenizer"], section="reward_model")
        self.micro_batches = reward_micro_batches(config)

    def score(
        self, prompts: list[Any], completions: list[str], metadata: list[dict[str, Any]]
    ) -> Any:
        from rl_toolkit.environments import EnvironmentResult
        from rl_toolkit.models.reward.reward_model import reward_model_batch

        batch = reward_model_batch(
            self.tokenizer,
            prompts,
            completions,
            max_length=self.config["max_total_sequence_length"],
        )
        rewards = self.worker.score(batch, self.micro_batches)["rewards"]
        return EnvironmentResult(rewards=rewards.tolist(), metrics={})


def rl_toolkit_config(
    args: dict[str, Any],
    attn_implementation: str,
    mb_tokens: int | None,
    lora: dict[str, Any] | None,
) -> dict[str, Any]:
    """configs/ppo_tiny.yaml with the benchmark's models, batch, loss and sampling settings,
    checked as a PPO run checks its config."""
    from rl_toolkit.config_schema import PPOMasterConfig, check_ppo_config
    from rl_toolkit.utils.config import load_config, validate_config

    cfg = load_config(REPO / "configs" / "ppo_tiny.yaml")
    rows = args["prompts_per_step"]
    cfg["grpo"] |= {
        "num_prompts_per_step": rows,
        "num_generations_per_prompt": 1,
        "dynamic_sampling": {"enabled": False, "max_gen_batches": 1},
        "overlong_filtering": False,
        "sft_warmup_steps": 0,
        "seed": SEED,
    }
    cfg["loss_fn"] |= {
        "policy_loss": "ppo_clip",
        "ratio_level": "token",
        "ratio_clip_min": CLIP_EPSILON,
        "ratio_clip_max": CLIP_EPSILON,
        "ratio_clip_c": None,
        "reference_policy_kl_penalty": KL_COEF,
        "kl_in_reward": True,
        "kl_estimator": "k1",
        "aggregation": "token_mean",
        "importance_correction": "none",
        "entropy_coef": 0.0,
    }
    cfg["ppo"] |= {
        "gae_gamma": GAE_GAMMA,
        "gae_lambda": GAE_LAMBDA,
        "whiten_advantages": True,
        "critic_warmup_steps": 0,
        "critic_epochs": 1,
    }
    cfg["value_loss_fn"] = {"value_clip": VALUE_CLIP}
    # grpo_step.py's, with one optimizer step per rollout and no gradient clipping (PPOTrainer
    # clips none).
    policy_config(
        cfg["policy"], args, attn_implementation, mb_tokens, lora,
        train_global_batch_size=args["prompts_per_step"], max_grad_norm=None,
    )  # fmt: skip
    policy = cfg["policy"]
    precision, fsdp = policy["precision"], dict(policy["fsdp"])
    cfg["critic"] |= {
        "model_name": args["value_dir"],
        "precision": precision,
        "random_init": False,
        "seed": SEED,
        "train_global_batch_size": rows,  # one critic step per rollout
        "micro_batch": dict(policy["micro_batch"]),
        "attn_implementation": attn_implementation,
        "fsdp": fsdp,
        "optimizer": {
            "name": "torch.optim.AdamW",
            "kwargs": dict(policy["optimizer"]["kwargs"]),
        },
        "scheduler": list(policy["scheduler"]),
        "max_grad_norm": None,
    }
    cfg["reward_model"] = {
        "model_name": args["reward_dir"],
        "tokenizer": {"name": args["reward_dir"], "chat_template": None},
        "precision": precision,
        "micro_batch": {"unit": "tokens", "size": policy["micro_batch"]["logprob"]},
        "max_total_sequence_length": args["max_length"],
        "attn_implementation": attn_implementation,
        "fsdp": fsdp,
    }
    validate_config(cfg, PPOMasterConfig, {})
    check_ppo_config(cfg)
    return cfg


def run_rl_toolkit(
    args: dict[str, Any],
    prompts: list[list[int]],
    attn_implementation: str,
    mb_tokens: int | None,
    lora: dict[str, Any] | None,
) -> tuple[list[tuple[float, float]], list[int]]:
    """PPO steps with the recipe's functions on plain workers; step times and rollout tokens per
    step. ``mb_tokens`` replaces the token budgets of the policy and the critic when given;
    ``lora`` is policy.lora."""
    from transformers import AutoTokenizer

    from rl_toolkit.algorithms import ppo
    from rl_toolkit.algorithms.grpo import sample_rollout
    from rl_toolkit.algorithms.loss_functions import ClippedPGLossFn, ValueLossFn
    from rl_toolkit.data import prompt_collate_fn
    from rl_toolkit.models.policy.worker import PolicyWorker
    from rl_toolkit.models.value.worker import ValueWorker
    from rl_toolkit.utils.timer import Timer

    cfg = rl_toolkit_config(args, attn_implementation, mb_tokens, lora)
    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    worker = PolicyWorker(
        config=cfg["policy"], tokenizer=tokenizer, init_optimizer=True, init_reference_model=True
    )
    policy = InProcessPolicy(worker)
    critic = ValueWorker(
        config=cfg["critic"], tokenizer=tokenizer, section="critic", init_optimizer=True
    )
    reward_model = InProcessRewardModel(cfg["reward_model"])
    loss_fn, value_loss_fn = ClippedPGLossFn(cfg["loss_fn"]), ValueLossFn(cfg["value_loss_fn"])
    size = args["prompts_per_step"]
    items = [
        {"prompt_id": index, "input_ids": torch.tensor(ids), "prompt": text(ids), "metadata": {}}
        for index, ids in enumerate(prompts)
    ]
    batches = iter(
        prompt_collate_fn(items[start : start + size], pad_token_id=PAD_ID)
        for start in range(0, len(items), size)
    )
    clock, tokens, timer = StepClock(), [], Timer()
    for step in range(len(prompts) // size):
        sampled = sample_rollout(
            policy, reward_model, lambda: next(batches, None), tokenizer, cfg["grpo"], step
        )
        assert sampled is not None, "a step without prompts"
        rollout, _ = sampled
        ppo.train_on_rollout(
            policy, critic, rollout, loss_fn, value_loss_fn, cfg, timer, train_policy=True
        )
        clock.lap()
        tokens.append(int(rollout["token_mask"].sum()))
    worker.shutdown()  # the process group the three workers share
    return clock.laps, tokens


# ---------------------------------------------------------------------------------------------
# TRL


class RecordingLoader:
    """A data loader that records the queries of every step and opens its token count."""

    def __init__(self, loader: Any, queries: list[torch.Tensor], tokens: list[int]) -> None:
        self.loader, self.queries, self.tokens = loader, queries, tokens

    def __iter__(self) -> Any:
        for batch in self.loader:
            self.queries.append(batch["input_ids"])  # (P, prompt width), left-padded
            self.tokens.append(0)
            yield batch


def run_trl(
    args: dict[str, Any], prompts: list[list[int]]
) -> tuple[list[tuple[float, float]], list[int]]:
    """PPO steps with TRL's PPOTrainer; step times and rollout tokens per step."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    # PPOTrainer generates after the batch's last column: prompts padded on the left.
    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    value_model, reward_model = (
        AutoModelForSequenceClassification.from_pretrained(args[key], dtype=torch.float32)
        for key in ("value_dir", "reward_dir")
    )
    dataset = Dataset.from_dict({"input_ids": prompts})
    rows = args["prompts_per_step"]
    config = PPOConfig(
        # max_grad_norm 0: none (PPOTrainer's loop never clips anyway)
        **trl_common_args(args, learning_rate=LEARNING_RATE, max_grad_norm=0.0, seed=SEED),
        per_device_train_batch_size=rows,
        total_episodes=len(prompts),
        num_ppo_epochs=1,
        num_mini_batches=1,
        local_rollout_forward_batch_size=rows,  # generate and score the step in one batch
        response_length=args["max_new_tokens"],
        stop_token="eos",
        temperature=1.0,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        cliprange=CLIP_EPSILON,
        vf_coef=1.0,
        cliprange_value=VALUE_CLIP,
        gamma=GAE_GAMMA,
        lam=GAE_LAMBDA,
        whiten_rewards=False,
        num_sample_generations=0,
    )
    timer = trl_step_timer()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # a deep copy of the initial policy
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        callbacks=[timer],
    )
    # PPOTrainer shuffles its prompts; the same loader without shuffling takes them in order,
    # as rl_toolkit's steps do, and records what each step took.
    queries: list[torch.Tensor] = []
    tokens: list[int] = []
    loader = DataLoader(dataset, batch_size=rows, collate_fn=trainer.data_collator, drop_last=True)
    trainer.dataloader = RecordingLoader(trainer.accelerator.prepare(loader), queries, tokens)

    def count_completion_tokens(_: Any, __: Any, kwargs: dict[str, Any]) -> None:
        # The reward model reads prompt + completion cut after EOS, right-padded: its mask past
        # the prompt's columns covers the generated tokens, EOS included.
        tokens[-1] += int(kwargs["attention_mask"][:, queries[-1].shape[1] :].sum())

    backbone = getattr(reward_model, reward_model.base_model_prefix)
    backbone.register_forward_pre_hook(count_completion_tokens, with_kwargs=True)
    timer.clock = StepClock()
    trainer.train()
    seen = [row[row != PAD_ID].tolist() for batch in queries for row in batch]
    assert seen == prompts, "TRL's steps took other prompts than rl_toolkit's"
    return timer.clock.laps, tokens


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
    main(
        __file__,
        PRESETS,
        child_main,
        __doc__,
        flops_per_param=20,
        write_inputs=write_scalar_models,
        check_framework=check_framework,
    )
