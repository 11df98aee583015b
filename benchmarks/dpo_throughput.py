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
"""

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_WORD_ID = 3

# Model and data per device. Lengths are log-normal with median max_part / 5 (long-tailed),
# clipped to [min_len, max_part]; prompt + response never exceeds max_length, so nothing is
# truncated by either framework.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": {
            "hidden_size": 384,
            "intermediate_size": 1024,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "num_key_value_heads": 6,
            "vocab_size": 16000,
        },
        "max_length": 256,
        "pairs_per_step": 8,
        "micro_batch": {"unit": "tokens", "train": 2048, "logprob": 4096},
        "warmup_steps": 1,
        "steps": 4,
        "rounds": 3,
    },
    "gpu": {
        "model": {
            "hidden_size": 1536,
            "intermediate_size": 4096,
            "num_hidden_layers": 16,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
        },
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
SEED = 1234

# A run of rl_toolkit with another attention implementation and/or token budget: rl_toolkit@sdpa:512
RL_TOOLKIT_RUN = re.compile(r"rl_toolkit(?:@(\w+))?(?::(\d+))?")

# Dense bf16 peak of the GPU (no sparsity), for MFU; other GPUs need --peak-tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


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


def write_model_dir(path: Path, model_kwargs: dict[str, Any], max_length: int) -> None:
    """A randomly initialised Llama (seeded) and a word-level tokenizer (``w<id>`` is token ``id``).

    Both frameworks load these weights, so they start from the same model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(
        **model_kwargs,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab |= {f"w{i}": i for i in range(FIRST_WORD_ID, model_kwargs["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(path)


def _text(ids: list[int]) -> str:
    return " ".join("</s>" if i == EOS_ID else f"w{i}" for i in ids)


# ---------------------------------------------------------------------------------------------
# One framework in this process


def _set_threads() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 1)


def run_rl_toolkit(
    args: dict[str, Any],
    pairs: list[dict[str, list[int]]],
    attn_implementation: str,
    mb_tokens: int | None,
) -> list[float]:
    """Train with the plain PolicyWorker; return the wall time of every step.

    ``mb_tokens`` replaces both token budgets of the preset when given.
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
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.clock = StepClock()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.clock.lap()

    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    dataset = Dataset.from_list(
        [
            {
                "prompt": _text(p["prompt"]),
                "chosen": " " + _text(p["chosen"]),
                "rejected": " " + _text(p["rejected"]),
            }
            for p in pairs
        ]
    )
    config = DPOConfig(
        output_dir=args["output_dir"],
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        per_device_train_batch_size=args["pairs_per_step"],
        gradient_accumulation_steps=1,
        max_steps=len(pairs) // args["pairs_per_step"],
        max_length=args["max_length"],
        precompute_ref_log_probs=False,
        gradient_checkpointing=args["activation_checkpointing"],
        bf16=on_gpu,
        use_cpu=not on_gpu,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=10**9,
        seed=SEED,
        disable_tqdm=True,
    )
    timer = StepTimer()
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


class StepClock:
    """Wall and CPU seconds (all threads of this process) between consecutive ``lap()`` calls.

    On a shared machine the wall time also counts the time other processes held the cores; the
    process's own CPU time mostly does not, so tokens per CPU second is the steadier figure.
    """

    def __init__(self) -> None:
        self.laps: list[tuple[float, float]] = []  # (wall s, cpu s) per step
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps.append((wall - self.wall, cpu - self.cpu))
        self.wall, self.cpu = wall, cpu


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_main(framework: str, args_path: str) -> None:
    """Run one framework and print one JSON line with its step times and peak memory."""
    args = json.loads(Path(args_path).read_text())
    _set_threads()
    num_pairs = (args["warmup_steps"] + args["steps"]) * args["pairs_per_step"]
    pairs = make_pairs(num_pairs, args["max_length"], args["model"]["vocab_size"], SEED)
    if framework == "trl":
        times = run_trl(args, pairs)
    else:
        variant = RL_TOOLKIT_RUN.fullmatch(framework)
        assert variant is not None, f"unknown framework {framework!r}"
        attn_implementation, mb_tokens = variant.groups()
        mb_tokens = int(mb_tokens) if mb_tokens else None
        times = run_rl_toolkit(args, pairs, attn_implementation or "varlen", mb_tokens)
    result = {"times": times, "tokens": tokens_per_step(pairs, args["pairs_per_step"])}
    print("RESULT " + json.dumps(result | {"peak_memory_mib": _peak_memory_mib()}), flush=True)


# ---------------------------------------------------------------------------------------------
# The driver: alternate the frameworks, summarise


def summarise(result: dict[str, Any], warmup_steps: int) -> dict[str, float]:
    """Tokens per wall second and per CPU second, and the mean step time, of the timed steps."""
    laps = result["times"][warmup_steps:]
    tokens = sum(result["tokens"][warmup_steps : warmup_steps + len(laps)])
    assert laps and len(result["tokens"]) >= warmup_steps + len(laps), "too few steps"
    wall, cpu = sum(lap[0] for lap in laps), sum(lap[1] for lap in laps)
    return {
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu,
        "step_s": wall / len(laps),
        "peak_memory_mib": result["peak_memory_mib"],
    }


def model_flops_utilisation(tokens_per_s: float, num_params: int, peak_tflops: float) -> float:
    """``6 * N * tokens/s / peak``: training FLOPs per token without attention's."""
    return 6 * num_params * tokens_per_s / (peak_tflops * 1e12)


def _num_params(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def _peak_tflops(requested: float | None) -> float | None:
    if requested is not None or not torch.cuda.is_available():
        return requested
    name = torch.cuda.get_device_name()
    matches = [tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name]
    return matches[0] if matches else None


def run_child(framework: str, args_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", framework, "--args", str(args_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"the {framework} run failed (exit status {proc.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def print_table(runs: dict[str, list[dict[str, float]]], mfu: dict[str, float]) -> None:
    medians = {
        fw: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for fw, rs in runs.items()
    }
    header = f"{'tokens/s':>10}{'tokens/cpu-s':>14}{'step s':>9}{'peak MiB':>10}{'MFU':>7}"
    print(f"\n{'framework':<22}{header}")
    for fw, m in medians.items():
        mfu_text = f"{mfu[fw]:.1%}" if fw in mfu else "-"
        line = (
            f"{m['tokens_per_s']:>10.1f}{m['tokens_per_cpu_s']:>14.1f}{m['step_s']:>9.3f}"
            f"{m['peak_memory_mib']:>10.0f}{mfu_text:>7}"
        )
        print(f"{fw:<22}{line}")
    # Every run against TRL (or, without TRL, against the first run): each round runs them back
    # to back, so a per-round ratio shares most of the load other processes put on a shared
    # machine; the median over rounds is the headline.
    base = "trl" if "trl" in runs else next(iter(runs))
    for fw in runs:
        if fw == base:
            continue
        for key in ("tokens_per_s", "tokens_per_cpu_s"):
            ratios = [
                ours[key] / other[key] for ours, other in zip(runs[fw], runs[base], strict=True)
            ]
            print(
                f"{fw} / {base} {key}: x{statistics.median(ratios):.2f} (median of the "
                f"per-round ratios {', '.join(f'{r:.2f}' for r in ratios)})"
            )
        memory = medians[fw]["peak_memory_mib"] / medians[base]["peak_memory_mib"]
        print(f"{fw} / {base} peak memory: x{memory:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="default: gpu when CUDA is available, else cpu",
    )
    parser.add_argument("--steps", type=int, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, help="A B rounds")
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute decoder layers in backward, in both frameworks",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument(
        "--frameworks",
        default="rl_toolkit,trl",
        help="runs of each round, in order: trl, or rl_toolkit[@ATTN][:TOKENS] with another "
        "policy.attn_implementation and/or token budget per micro-batch (e.g. "
        "rl_toolkit@sdpa:512); rl_toolkit alone where TRL is not installed",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        child_main(cli.child, cli.args)
        return
    for framework in cli.frameworks.split(","):
        if framework != "trl" and not RL_TOOLKIT_RUN.fullmatch(framework):
            parser.error(f"--frameworks: {framework!r} is not trl or rl_toolkit[@ATTN][:TOKENS]")
    preset_name = cli.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    args = dict(PRESETS[preset_name])
    for key in ("steps", "warmup_steps", "rounds"):
        if getattr(cli, key) is not None:
            args[key] = getattr(cli, key)
    args["activation_checkpointing"] = cli.activation_checkpointing
    with tempfile.TemporaryDirectory() as tmp:
        args |= {"model_dir": f"{tmp}/model", "output_dir": f"{tmp}/trl_out"}
        write_model_dir(Path(args["model_dir"]), args["model"], args["max_length"])
        args_path = Path(tmp) / "args.json"
        args_path.write_text(json.dumps(args))
        num_params = _num_params(args["model_dir"])
        print(f"preset {preset_name}: {num_params / 1e6:.1f}M parameters, {json.dumps(args)}")
        runs: dict[str, list[dict[str, float]]] = {}
        for round_idx in range(args["rounds"]):
            for framework in cli.frameworks.split(","):
                result = summarise(run_child(framework, args_path), args["warmup_steps"])
                runs.setdefault(framework, []).append(result)
                print(f"round {round_idx} {framework}: {json.dumps(result)}", flush=True)
    peak = _peak_tflops(cli.peak_tflops)
    mfu = {}
    if peak is not None:
        mfu = {
            fw: model_flops_utilisation(
                statistics.median(r["tokens_per_s"] for r in rs), num_params, peak
            )
            for fw, rs in runs.items()
        }
    print_table(runs, mfu)


if __name__ == "__main__":
    main()
