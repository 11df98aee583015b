"""The SFT configs load and validate; mistakes are one line naming the key, before any worker."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rl_toolkit.algorithms.sft import MasterConfig, check_config
from rl_toolkit.config_schema import resolve_local_paths
from rl_toolkit.utils.config import ConfigError, load_config, load_yaml_with_defaults

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "sft.yaml"
TINY = REPO / "configs" / "sft_tiny.yaml"


def tiny(*overrides: str) -> MasterConfig:
    config = load_config(TINY, overrides, schema=MasterConfig)
    resolve_local_paths(config)
    return config


def one_line_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        check_config(tiny(*overrides))
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("path", [BASE, TINY], ids=lambda p: p.name)
def test_config_validates(path: Path) -> None:
    check_config(load_config(path, schema=MasterConfig))  # schema, rules, optimizer dry run


def test_base_defaults_are_for_real_models() -> None:
    config = load_config(BASE, schema=MasterConfig)
    policy, data = config["policy"], config["data"]
    assert policy["random_init"] is False and policy["precision"] == "bfloat16"
    assert policy["optimizer"]["kwargs"]["lr"] == 5.0e-6 and config["cluster"]["gpus_per_node"] == 1
    assert data["format"] == "chat" and data["train_data_path"] == "HuggingFaceH4/ultrachat_200k"
    assert (data["train_split"], data["val_split"]) == ("train_sft", "test_sft")


def test_the_embedded_default_is_a_small_override_of_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert TINY.read_text().count("\ndefaults: sft.yaml\n") == 1
    base = set(load_yaml_with_defaults(BASE).sources)
    keys = set(load_yaml_with_defaults(TINY).sources)
    assert keys <= base | {k for k in keys if k.startswith("policy.scheduler")}
    monkeypatch.chdir(tmp_path)  # the shipped paths resolve from any working directory
    config = tiny()
    assert config["policy"]["model_name"] == str(REPO / "assets" / "tiny_llama")
    assert config["data"]["train_data_path"] == str(REPO / "assets" / "tiny_sft" / "train.jsonl")
    assert config["policy"]["random_init"] is True and config["cluster"]["gpus_per_node"] == 2


def test_every_default_is_commented() -> None:
    # Every key with a value says what it is; the scheduler entries are explained above the list.
    for number, line in enumerate(BASE.read_text().splitlines(), 1):
        if re.match(r"^\s*[a-z_]+: \S", line) and not re.match(
            r"^\s+(- )?(name|kwargs|start_factor|end_factor|total_iters|factor|milestones):", line
        ):
            assert "#" in line, f"configs/sft.yaml:{number} has no comment: {line.strip()}"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sft.val_period=-1", "'sft.val_period': input should be greater than or equal to 0"),
        ("sft.max_num_epochs=0", "'sft.max_num_epochs': input should be greater than or equal"),
        ("data.format=csv", "'data.format': input should be 'chat', 'prompt_completion' or"),
        ("data.overlong_policy=truncate_prompt", "'data.overlong_policy': input should be"),
        ("data.messages_key=null", "'data.messages_key': input should be a valid string"),
        ("sft.val_perod=3", "unknown key 'sft.val_perod'"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TINY, [override], schema=MasterConfig)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["cluster.gpus_per_node=3"],
            "policy.train_global_batch_size=32 must split evenly over 3 workers "
            "(cluster.gpus_per_node x cluster.num_nodes): use a multiple of 3",
        ),
        (
            ["cluster.num_nodes=2", "sft.val_global_batch_size=6"],
            "sft.val_global_batch_size=6 must split evenly over 4 workers",
        ),
        (
            ["policy.micro_batch={unit: rows, train: 3, logprob: 4}"],
            "policy.micro_batch.train=3 rows must divide the 16 sequences each of the 2 workers "
            "gets of policy.train_global_batch_size=32",
        ),
        (["policy.optimizer.kwargs.lr=-1"], "policy.optimizer.kwargs.lr must be a number > 0"),
        (["policy.attn_implementation=flashy"], "policy.attn_implementation='flashy'"),
        (["policy.optimizer.kwargs.momentum=0.9"], "policy.optimizer.kwargs do not fit"),
    ],
)
def test_rules_between_keys_fail_before_any_worker(overrides: list[str], expected: str) -> None:
    assert expected in one_line_error(*overrides)


def test_odd_batch_sizes_are_fine_for_sft() -> None:
    # No pairs: any whole number of sequences per worker, and with packing any row size.
    check_config(tiny("policy.train_global_batch_size=6", "sft.val_global_batch_size=14"))
    check_config(tiny("policy.micro_batch.train=5", "policy.micro_batch.logprob=3"))


def test_unwritable_output_folders_fail_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "checkpointing.checkpoint_dir=" in one_line_error(
        f"checkpointing.checkpoint_dir={blocker}/ckpt"
    )
    assert "logger.log_dir=" in one_line_error(f"logger.log_dir={blocker}/logs")


def test_config_mistakes_are_reported_before_torch_ray_or_transformers_load(
    tmp_path: Path,
) -> None:
    # From another working directory, as a user would; the script exits before its imports.
    code = f"""
        import json, runpy, sys
        sys.argv = ["run_sft.py", *sys.argv[1:]]
        try:
            runpy.run_path({str(REPO / "examples" / "run_sft.py")!r}, run_name="__main__")
        except SystemExit as exit:
            heavy = [m for m in ("torch", "ray", "transformers") if m in sys.modules]
            print(json.dumps({{"code": exit.code, "heavy": heavy}}))
    """
    for override in ("sft.max_num_epochs=0", "cluster.gpus_per_node=3", "data.format=csv"):
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), override],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert json.loads(result.stdout) == {"code": 2, "heavy": []}, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
