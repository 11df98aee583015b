"""Generation throughput: rl_toolkit's `hf` backend side by side with transformers' `generate`.

    uv run python benchmarks/generation_throughput.py            # 2-core CPU preset
    uv run python benchmarks/generation_throughput.py --preset gpu

Both sample from the same randomly initialised Llama-architecture model (same config, same
seed) for the same prompts, in the same batches, with the same settings (temperature 1, no top-k
or top-p, at most `max_new_tokens` new tokens, EOS stops a response), for `--warmup-steps`
untimed batches and then `--steps` timed ones. A step is one call: `PolicyWorker.generate` on
the batch, or `model.generate(..., do_sample=True)` on the same prompts left-padded. Each
framework runs in its own subprocess, alternating over `--rounds` rounds; the figures are the
medians over rounds and the ratio is rl_toolkit / transformers.

rl_toolkit runs as the plain `PolicyWorker` in this process (world size 1, no Ray), built as a
GRPO run builds it (FSDP2-sharded, varlen attention for training): each call gathers the
weights, switches to sdpa, samples with its own seeded sampler and KV cache, and reshards.
transformers runs `AutoModelForCausalLM.from_pretrained` (sdpa) and `generate` with its default
dynamic KV cache. Generated tokens per step: the response tokens (EOS included) each framework
actually produced, counted from its own output. Peak memory: the subprocess's peak RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU; MFU (GPU only): `2 * num_params * tokens / time /
peak_flops`. The model, the clock, the rounds and the table are benchmarks/harness.py.
"""

import math
from typing import Any

import numpy as np
import torch
from harness import EOS_ID, FIRST_WORD_ID, MODELS, PAD_ID, REPO, SEED, StepClock, main, print_result

# Model and prompts per device. Prompt lengths are log-normal with median max_prompt / 5,
# clipped to [4, max_prompt]; max_prompt + max_new_tokens <= max_length.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": MODELS["cpu"],
        "max_length": 256,
        "max_prompt": 128,
        "prompts_per_step": 32,
        "max_new_tokens": 64,
        "warmup_steps": 1,
        "steps": 3,
        "rounds": 3,
    },
    "gpu": {
        "model": MODELS["gpu"],
        "max_length": 1536,
        "max_prompt": 512,
        "prompts_per_step": 64,
        "max_new_tokens": 512,
        "warmup_steps": 1,
        "steps": 3,
        "rounds": 2,
    },
}
TRANSFORMERS = "transformers"


def make_prompts(num_prompts: int, max_prompt: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token-id prompts with log-normal, long-tailed lengths (no EOS inside)."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=math.log(max_prompt / 5), sigma=0.75, size=num_prompts)
    lengths = np.clip(np.round(raw), 4, max_prompt).astype(int)
    return [rng.integers(FIRST_WORD_ID, vocab_size, size=n).tolist() for n in lengths]


def batches(args: dict[str, Any]) -> list[list[list[int]]]:
    """The prompts of every step, warm-up steps first."""
    size = args["prompts_per_step"]
    num_steps = args["warmup_steps"] + args["steps"]
    prompts = make_prompts(num_steps * size, args["max_prompt"], args["model"]["vocab_size"], SEED)
    return [prompts[start : start + size] for start in range(0, len(prompts), size)]


def run_rl_toolkit(args: dict[str, Any]) -> tuple[list[tuple[float, float]], list[int]]:
    """Generate with the plain PolicyWorker; step times and generated tokens per step."""
    from transformers import AutoTokenizer

    from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
    from rl_toolkit.models.policy.worker import PolicyWorker
    from rl_toolkit.utils.config import load_config

    policy_cfg = load_config(REPO / "configs" / "dpo_tiny.yaml")["policy"]
    policy_cfg |= {
        "model_name": args["model_dir"],
        "random_init": False,
        "precision": "bfloat16" if torch.cuda.is_available() else "float32",
        "seed": SEED,
        "max_total_sequence_length": args["max_length"],
        "generation": {
            "backend": "hf",
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "max_new_tokens": args["max_new_tokens"],
            "stop_token_ids": [],
        },
    }
    policy_cfg["tokenizer"]["name"] = args["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    worker = PolicyWorker(
        config=policy_cfg, tokenizer=tokenizer, init_optimizer=False, init_reference_model=False
    )
    clock, tokens = StepClock(), []
    for step, prompts in enumerate(batches(args)):
        input_ids = torch.full((len(prompts), max(map(len, prompts))), PAD_ID)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.tensor(prompt)
        data = BatchedDataDict(
            input_ids=input_ids,
            input_lengths=torch.tensor([len(prompt) for prompt in prompts]),
            prompt_ids=torch.arange(step * len(prompts), (step + 1) * len(prompts)),
            sample_idx=torch.zeros(len(prompts), dtype=torch.long),
        )
        rollout = worker.generate(data, step=step, greedy=False)
        clock.lap()
        tokens.append(int(rollout["token_mask"].sum()))
    worker.shutdown()
    return clock.laps, tokens


def run_transformers(args: dict[str, Any]) -> tuple[list[tuple[float, float]], list[int]]:
    """Generate with transformers' `generate`; step times and generated tokens per step."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=dtype).to(device).eval()
    clock, tokens = StepClock(), []
    for prompts in batches(args):
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), PAD_ID)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding, as generate wants
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=args["max_new_tokens"],
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
        )
        clock.lap()
        tokens.append(_num_generated(output[:, width:].cpu()))
    return clock.laps, tokens


def _num_generated(new_tokens: torch.Tensor) -> int:
    """Tokens up to and including each row's first EOS (generate pads after it)."""
    is_eos = new_tokens == EOS_ID  # (b, M)
    ended = is_eos.cumsum(dim=1) - is_eos.long() > 0  # after the first EOS
    return int((~ended).sum())


def child_main(framework: str, args: dict[str, Any]) -> None:
    """Run one framework and print its RESULT line (harness.print_result)."""
    if framework == TRANSFORMERS:
        times, tokens = run_transformers(args)
    elif framework == "rl_toolkit":
        times, tokens = run_rl_toolkit(args)
    else:
        raise SystemExit(f"--frameworks: {framework!r} is not rl_toolkit or {TRANSFORMERS}")
    print_result(times, tokens)


if __name__ == "__main__":
    main(__file__, PRESETS, child_main, __doc__, trl_runs=(TRANSFORMERS,), flops_per_param=2)
