"""SFT training throughput: rl_toolkit side by side with TRL's SFTTrainer.

    uv run --group benchmark python benchmarks/sft_throughput.py            # 2-core CPU preset
    uv run --group benchmark python benchmarks/sft_throughput.py --preset gpu

Both frameworks train the same randomly initialised Llama-architecture model (same config, same
seed, written by harness.write_model_dir) on the same synthetic prompt-completion rows, in the
same order, with the loss on the completion only (TRL's default for prompt-completion data), the
same optimizer, lr, batch and maximum length, for `--warmup-steps` untimed steps and then
`--steps` timed steps. Each framework runs in its own subprocess, alternating A B A B over
`--rounds` rounds; the figures are the median over rounds (harness.py).

rl_toolkit runs as the plain `PolicyWorker` in this process (world size 1, no Ray) with
NLLLossFn on sft_collate_fn's batches, each framework with its defaults otherwise: rl_toolkit
packs each micro-batch into one padding-free row with varlen attention (`rl_toolkit@sdpa:512`
for sdpa and a budget of 512 tokens); TRL pads each batch to its longest row (`trl`), or with
`trl-padding-free` flattens the batch into one row with position ids (SFTConfig.padding_free).

Training tokens per step: prompt + completion tokens (EOS included) that are not padding, of
every row of the step, computed from the data for both frameworks. Peak memory: the
subprocess's peak RSS on CPU, `torch.cuda.max_memory_allocated` on GPU. MFU (GPU only):
`6 * num_params * tokens / time / peak_flops`.
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

# Model and data per device: the models of dpo_throughput.py. Lengths are log-normal with median
# max_part / 5 (long-tailed), clipped to [min_len, max_part]; prompt + completion never exceeds
# max_length, so nothing is truncated by either framework.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": MODELS["cpu"],
        "max_length": 512,
        "rows_per_step": 16,
        "micro_batch": {"unit": "tokens", "train": 2048, "logprob": 4096},
        "warmup_steps": 1,
        "steps": 4,
        "rounds": 3,
    },
    "gpu": {
        "model": MODELS["gpu"],
        "max_length": 4096,
        "rows_per_step": 32,
        "micro_batch": {"unit": "tokens", "train": 16384, "logprob": 16384},
        "warmup_steps": 3,
        "steps": 10,
        "rounds": 2,
    },
}
LEARNING_RATE = 1.0e-5
MAX_GRAD_NORM = 1.0
TRL_RUNS = ("trl", "trl-padding-free")


def make_rows(num_rows: int, max_length: int, vocab_size: int, seed: int) -> list[dict]:
    """Synthetic prompt-completion rows with log-normal, long-tailed lengths.

    Returns:
        ``num_rows`` dicts of token-id lists: ``prompt`` and ``completion`` (ending with EOS);
        ``len(prompt) + len(completion) <= max_length``.
    """
    rng = np.random.default_rng(seed)
    max_part = max_length // 2

    def lengths(minimum: int) -> np.ndarray:
        raw = rng.lognormal(mean=math.log(max_part / 5), sigma=0.75, size=num_rows)
        return np.clip(np.round(raw), minimum, max_part).astype(int)

    rows = []
    for p_len, c_len in zip(lengths(4), lengths(2), strict=True):
        words = rng.integers(FIRST_WORD_ID, vocab_size, size=p_len + c_len).tolist()
        rows.append(
            {"prompt": words[:p_len], "completion": words[p_len : p_len + c_len - 1] + [EOS_ID]}
        )
    return rows


def tokens_per_step(rows: list[dict], rows_per_step: int) -> list[int]:
    """Non-padding tokens of each step: prompt + completion of every row."""
    per_row = [len(row["prompt"]) + len(row["completion"]) for row in rows]
    return [
        sum(per_row[start : start + rows_per_step]) for start in range(0, len(rows), rows_per_step)
    ]


def run_rl_toolkit(
    args: dict[str, Any],
    rows: list[dict],
    attn_implementation: str,
    mb_tokens: int | None,
    lora: dict[str, Any] | None,
) -> list[tuple[float, float]]:
    """Train with the plain PolicyWorker and NLLLossFn (``lora``: policy.lora); return every
    step's times."""
    from transformers import AutoTokenizer

    from rl_toolkit.algorithms.loss_functions import NLLLossFn
    from rl_toolkit.config_schema import micro_batches
    from rl_toolkit.data.collate import sft_collate_fn
    from rl_toolkit.models.policy.worker import PolicyWorker
    from rl_toolkit.utils.config import load_config

    policy_cfg = load_config(REPO / "configs" / "sft_tiny.yaml")["policy"]
    step = args["rows_per_step"]
    policy_cfg |= {
        "model_name": args["model_dir"],
        "random_init": False,
        "precision": "bfloat16" if torch.cuda.is_available() else "float32",
        "seed": SEED,
        "train_global_batch_size": step,
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
        policy_cfg["micro_batch"] |= {"train": mb_tokens}
    policy_cfg["optimizer"]["kwargs"] |= {"lr": LEARNING_RATE, "weight_decay": 0.0}
    policy_cfg["fsdp"]["activation_checkpointing"] = args["activation_checkpointing"]
    worker = PolicyWorker(
        config=policy_cfg,
        tokenizer=AutoTokenizer.from_pretrained(args["model_dir"]),
        init_optimizer=True,
        init_reference_model=False,
    )
    train_mbs = micro_batches(policy_cfg["micro_batch"], "train")
    items = [
        {
            "sample_id": index,
            "input_ids": torch.tensor(row["prompt"] + row["completion"]),
            # the completion learned, as sft_collate_fn's token_mask
            "token_mask": torch.tensor([0.0] * len(row["prompt"]) + [1.0] * len(row["completion"])),
        }
        for index, row in enumerate(rows)
    ]
    batches = [
        sft_collate_fn(items[start : start + step], pad_token_id=PAD_ID, pad_to_multiple_of=8)
        for start in range(0, len(items), step)
    ]
    loss_fn, clock = NLLLossFn(), StepClock()
    for batch in batches:
        worker.train(batch, loss_fn, train_mbs)
        clock.lap()
    worker.shutdown()
    return clock.laps


def run_trl(
    args: dict[str, Any], rows: list[dict], padding_free: bool
) -> list[tuple[float, float]]:
    """Train with TRL's SFTTrainer; return every step's times."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    # TRL appends EOS to the completion text itself.
    dataset = Dataset.from_list(
        [
            {"prompt": text(r["prompt"]), "completion": " " + text(r["completion"][:-1])}
            for r in rows
        ]
    )
    config = SFTConfig(
        **trl_common_args(
            args, learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM, seed=SEED
        ),
        per_device_train_batch_size=args["rows_per_step"],
        max_steps=len(rows) // args["rows_per_step"],
        # Every row fits; TRL enforces no max_length without packing when padding-free.
        max_length=None if padding_free else args["max_length"],
        completion_only_loss=True,
        padding_free=padding_free,
        packing=False,  # the same rows in every step as rl_toolkit's
    )
    timer = trl_step_timer()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    first = trainer.train_dataset[0]
    expected = rows[0]["prompt"] + rows[0]["completion"]
    assert first["input_ids"] == expected, "TRL tokenised the row differently"
    # The loss on the same tokens: TRL's labels are -100 on the prompt, the token elsewhere.
    assert first["labels"] == [-100] * len(rows[0]["prompt"]) + rows[0]["completion"]
    timer.clock = StepClock()
    trainer.train()
    return timer.clock.laps


def child_main(framework: str, args: dict[str, Any]) -> None:
    """Run one framework and print its RESULT line (harness.print_result)."""
    num_rows = (args["warmup_steps"] + args["steps"]) * args["rows_per_step"]
    rows = make_rows(num_rows, args["max_length"], args["model"]["vocab_size"], SEED)
    if framework in TRL_RUNS:
        times = run_trl(args, rows, padding_free=framework == "trl-padding-free")
    else:
        attn_implementation, mb_tokens, lora = parse_rl_toolkit_run(framework)
        times = run_rl_toolkit(args, rows, attn_implementation, mb_tokens, lora)
    print_result(times, tokens_per_step(rows, args["rows_per_step"]))


if __name__ == "__main__":
    main(__file__, PRESETS, child_main, __doc__, trl_runs=TRL_RUNS)
