"""What the side-by-side throughput benchmarks share: the model both frameworks load, the step
clock, the child processes, the rounds and the table of results.

A benchmark script (dpo_throughput.py, sft_throughput.py) defines its presets, its data and one
`run_<framework>` per framework, and calls `main(script, presets, child_main, doc)`: each round
runs every framework in its own subprocess (the script again, with `--child`), which prints one
`RESULT {json}` line with the wall and CPU time of every step, the training tokens of every step
and the peak memory. Each run's line shows the machine's load average just before it.
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_WORD_ID = 3
# The Llama-architecture model of every benchmark, per preset (random weights, write_model_dir):
# CPU 22.9M parameters (untied lm_head), GPU about 0.5B.
MODELS: dict[str, dict[str, int]] = {
    "cpu": {
        "hidden_size": 384,
        "intermediate_size": 1024,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "vocab_size": 16000,
    },
    "gpu": {
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 16,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}

SEED = 1234

# A run of rl_toolkit with another attention implementation, token budget and/or LoRA adapters
# (BENCHMARK_LORA): rl_toolkit@sdpa:512, rl_toolkit+lora
RL_TOOLKIT_RUN = re.compile(r"rl_toolkit(?:@(\w+))?(?::(\d+))?(\+lora)?")
# The policy.lora of a `+lora` run: the 8B LoRA recipe's adapters
# (configs/recipes/llama3.1_8b_instruct_helpsteer3_lora_1n8g.yaml).
BENCHMARK_LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def parse_rl_toolkit_run(framework: str) -> tuple[str, int | None, dict[str, Any] | None]:
    """``(attn_implementation, token budget or None, policy.lora or None)`` of a run's name."""
    match = RL_TOOLKIT_RUN.fullmatch(framework)
    assert match is not None, f"not a run of rl_toolkit: {framework}"
    attn_implementation, mb_tokens, lora = match.groups()
    return (
        attn_implementation or "varlen",
        int(mb_tokens) if mb_tokens else None,
        dict(BENCHMARK_LORA) if lora else None,
    )


# Dense bf16 peak of the GPU (no sparsity), for MFU; other GPUs need --peak-tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


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


def text(ids: list[int]) -> str:
    """The words of the word-level tokenizer that tokenise to ``ids``."""
    return " ".join("</s>" if i == EOS_ID else f"w{i}" for i in ids)


def set_threads() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 1)


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


def trl_step_timer() -> Any:
    """A transformers TrainerCallback whose ``clock`` laps at the end of every step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.clock = StepClock()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.clock.lap()

    return StepTimer()


def trl_common_args(
    args: dict[str, Any], *, learning_rate: float, max_grad_norm: float, seed: int
) -> dict[str, Any]:
    """The TRL trainer arguments both benchmarks use: the same optimiser settings as
    rl_toolkit's side, a constant rate, rows in order, and nothing but training (no evaluation,
    saving, logging or progress bar)."""
    on_gpu = torch.cuda.is_available()
    return {
        "output_dir": args["output_dir"],
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": max_grad_norm,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": args["activation_checkpointing"],
        "bf16": on_gpu,
        "use_cpu": not on_gpu,
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 10**9,
        "seed": seed,
        "disable_tqdm": True,
    }


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def print_result(times: list[tuple[float, float]], tokens: list[int]) -> None:
    """The child's one line for the driver: step times, tokens per step, peak memory."""
    result = {"times": times, "tokens": tokens, "peak_memory_mib": peak_memory_mib()}
    print("RESULT " + json.dumps(result), flush=True)


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


def model_flops_utilisation(
    tokens_per_s: float, num_params: int, peak_tflops: float, flops_per_param: int = 6
) -> float:
    """``flops_per_param * N * tokens/s / peak``: FLOPs per token without attention's (6 per
    parameter to train on a token, 2 to generate one)."""
    return flops_per_param * num_params * tokens_per_s / (peak_tflops * 1e12)


def num_params(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def peak_tflops(requested: float | None) -> float | None:
    if requested is not None or not torch.cuda.is_available():
        return requested
    name = torch.cuda.get_device_name()
    matches = [tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name]
    return matches[0] if matches else None


def run_child(script: str, framework: str, args_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, script, "--child", framework, "--args", str(args_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"the {framework} run failed (exit status {proc.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def print_table(
    runs: dict[str, list[dict[str, float]]], mfu: dict[str, float], baseline: str = "trl"
) -> None:
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
    # Every run against the baseline (or, without it, against the first run): each round runs
    # them back to back, so a per-round ratio shares most of the load other processes put on a
    # shared machine; the median over rounds is the headline.
    base = baseline if baseline in runs else next(iter(runs))
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


def main(
    script: str,
    presets: dict[str, dict[str, Any]],
    child_main: Callable[[str, dict[str, Any]], None],
    doc: str,
    trl_runs: tuple[str, ...] = ("trl",),
    flops_per_param: int = 6,
    *,
    write_inputs: Callable[[dict[str, Any], Path], None] | None = None,
    check_framework: Callable[[str], None] | None = None,
) -> None:
    """Parse the command line and run the benchmark (or, with --child, one framework's run).

    Args:
        script: the benchmark script's path (run again for each child).
        presets: per device ("cpu", "gpu"): model, data and run settings.
        child_main: `child_main(framework, args)` runs one framework and calls print_result.
        doc: the script's docstring (--help).
        trl_runs: the names of the other framework's runs the script knows, besides
            rl_toolkit[@ATTN][:TOKENS][+lora]; the first is the baseline of the ratios.
        flops_per_param: FLOPs per parameter and token, for MFU (6: training, 2: generation).
        write_inputs: `write_inputs(args, folder)` writes what every run loads besides the
            policy (more models) into the run's temporary folder, once, and adds their paths to
            `args`.
        check_framework: `check_framework(framework)` for every run asked for, before the
            first: exits with one line when a run cannot start (its library is missing).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=sorted(presets),
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
        default=f"rl_toolkit,{trl_runs[0]}",
        help=f"runs of each round, in order: {', '.join(trl_runs)}, or rl_toolkit[@ATTN][:TOKENS][+lora] "
        "with another policy.attn_implementation, token budget per micro-batch and/or LoRA "
        "adapters (e.g. rl_toolkit@sdpa:512, rl_toolkit+lora); rl_toolkit alone where TRL is "
        "not installed",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        set_threads()
        child_main(cli.child, json.loads(Path(cli.args).read_text()))
        return
    frameworks = cli.frameworks.split(",")
    for framework in frameworks:
        if framework not in trl_runs and not RL_TOOLKIT_RUN.fullmatch(framework):
            parser.error(
                f"--frameworks: {framework!r} is not {' or '.join(trl_runs)} or "
                "rl_toolkit[@ATTN][:TOKENS][+lora]"
            )
        if check_framework is not None:
            check_framework(framework)
    preset_name = cli.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    args = dict(presets[preset_name])
    for key in ("steps", "warmup_steps", "rounds"):
        if getattr(cli, key) is not None:
            args[key] = getattr(cli, key)
    args["activation_checkpointing"] = cli.activation_checkpointing
    runs = _run_rounds(script, frameworks, args, preset_name, write_inputs)
    mfu = _mfu(runs, args["num_params"], peak_tflops(cli.peak_tflops), flops_per_param)
    print_table(runs, mfu, baseline=trl_runs[0])


def _run_rounds(
    script: str,
    frameworks: list[str],
    args: dict[str, Any],
    preset_name: str,
    write_inputs: Callable[[dict[str, Any], Path], None] | None,
) -> dict[str, list[dict[str, float]]]:
    """Every framework once per round, in order; each run's summary, by framework."""
    with tempfile.TemporaryDirectory() as tmp:
        args |= {"model_dir": f"{tmp}/model", "output_dir": f"{tmp}/trl_out"}
        write_model_dir(Path(args["model_dir"]), args["model"], args["max_length"])
        if write_inputs is not None:
            write_inputs(args, Path(tmp))
        args_path = Path(tmp) / "args.json"
        args_path.write_text(json.dumps(args))
        args["num_params"] = num_params(args["model_dir"])
        print(
            f"preset {preset_name}: {args['num_params'] / 1e6:.1f}M parameters, {json.dumps(args)}"
        )
        runs: dict[str, list[dict[str, float]]] = {}
        for round_idx in range(args["rounds"]):
            for framework in frameworks:
                # The 1, 5 and 15 minute load averages: what else ran on the machine.
                load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
                result = summarise(run_child(script, framework, args_path), args["warmup_steps"])
                runs.setdefault(framework, []).append(result)
                print(
                    f"round {round_idx} {framework}: {json.dumps(result)} (load before: {load})",
                    flush=True,
                )
    return runs


def _mfu(
    runs: dict[str, list[dict[str, float]]],
    params: int,
    peak: float | None,
    flops_per_param: int,
) -> dict[str, float]:
    if peak is None:
        return {}
    return {
        fw: model_flops_utilisation(
            statistics.median(r["tokens_per_s"] for r in rs), params, peak, flops_per_param
        )
        for fw, rs in runs.items()
    }
