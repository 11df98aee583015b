"""The shipped DPO configs load and validate against MasterConfig (nothing is downloaded).

SFT's and GRPO's are tested in test_sft_config.py and test_grpo_recipe.py."""

import re
from pathlib import Path

import pytest

from rl_toolkit.algorithms.dpo import MasterConfig
from rl_toolkit.algorithms.loss_functions import validate_dpo_loss_config
from rl_toolkit.config_schema import check_master_config
from rl_toolkit.utils.config import load_config, load_yaml_with_defaults
from rl_toolkit.utils.hf_export import check_hf_export_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(
    path
    for path in (CONFIGS / "recipes").glob("*.yaml")
    if "\ndefaults: ../dpo.yaml\n" in path.read_text()
)
TINY = CONFIGS / "dpo_tiny.yaml"
LORA_RECIPE = CONFIGS / "recipes" / "llama3.1_8b_instruct_helpsteer3_lora_1n8g.yaml"


@pytest.mark.parametrize(
    "path", [CONFIGS / "dpo.yaml", TINY, *RECIPES, LORA_RECIPE], ids=lambda p: p.name
)
def test_config_validates(path: Path) -> None:
    config = load_config(path, schema=MasterConfig)
    validate_dpo_loss_config(config["dpo"])
    check_hf_export_config(config["checkpointing"])
    check_master_config(config)


def test_base_defaults_are_for_real_models() -> None:
    # A config that sets only policy.model_name fine-tunes that model, as NeMo RL's would.
    config = load_config(CONFIGS / "dpo.yaml", schema=MasterConfig)
    policy = config["policy"]
    assert policy["random_init"] is False and policy["precision"] == "bfloat16"
    assert policy["optimizer"]["kwargs"]["lr"] == 5.0e-6
    assert config["dpo"]["reference_policy_kl_penalty"] == 0.05
    assert policy["max_total_sequence_length"] >= 1024


def test_the_embedded_default_is_a_small_override_of_the_base() -> None:
    assert TINY.read_text().count("\ndefaults: dpo.yaml\n") == 1
    config = load_config(TINY, schema=MasterConfig)
    assert config["policy"]["model_name"] == "assets/tiny_llama"
    assert config["policy"]["random_init"] is True and config["cluster"]["gpus_per_node"] == 2


@pytest.mark.parametrize("name", ["dpo.yaml", "grpo.yaml", "ppo.yaml", "rm.yaml", "engine.yaml"])
def test_every_default_is_commented(name: str) -> None:
    # Every key with a value says what it is; the scheduler entries are explained above the list.
    lines = (CONFIGS / name).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if re.match(r"^\s*[a-z_]+: \S", line) and not re.match(
            r"^\s+(- )?(name|kwargs|start_factor|end_factor|total_iters|factor|milestones):", line
        ):
            assert "#" in line, f"configs/{name}:{number} has no comment: {line.strip()}"


def test_recipes_only_set_keys_the_base_has() -> None:
    base = set(load_yaml_with_defaults(CONFIGS / "dpo.yaml").sources)
    for recipe in [TINY, *RECIPES, LORA_RECIPE]:
        keys = set(load_yaml_with_defaults(recipe).sources)
        # The scheduler list and the LoRA section (null in the base) are set whole.
        whole = ("policy.scheduler", "policy.lora.")
        assert keys <= base | {k for k in keys if k.startswith(whole)}, recipe


def test_recipes_inherit_and_use_gpus() -> None:
    for recipe in RECIPES:
        config = load_config(recipe, schema=MasterConfig)
        assert config["policy"]["random_init"] is False
        assert config["policy"]["precision"] == "bfloat16"
        assert config["cluster"]["gpus_per_node"] == 8


def test_8b_recipe_is_four_nodes() -> None:
    config = load_config(
        CONFIGS / "recipes" / "llama3.1_8b_instruct_helpsteer3_4n8g.yaml", schema=MasterConfig
    )
    assert config["cluster"]["num_nodes"] == 4
    assert config["policy"]["model_name"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert config["policy"]["tokenizer"]["name"] == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("name", ["engine_dpo.yaml", "engine_grpo.yaml", "engine_rlhf.yaml"])
def test_the_engine_configs_pass_the_engine_and_built_in_checks(name: str) -> None:
    from rl_toolkit.config_schema import EngineConfig, check_runtime_schedule, resolve_local_paths
    from rl_toolkit.engine.builtin import check_builtin_config
    from rl_toolkit.engine.engine import check_sections

    config = load_config(CONFIGS / name)
    check_sections(config, EngineConfig)
    check_runtime_schedule(config["runtime"])
    resolve_local_paths(config)
    check_builtin_config(config)
    assert (
        config["runtime"]["train_global_batch_size"] == config["policy"]["train_global_batch_size"]
    )


def test_8b_lora_recipe_is_the_8b_recipe_with_adapters_on_one_node() -> None:
    full = load_config(
        CONFIGS / "recipes" / "llama3.1_8b_instruct_helpsteer3_4n8g.yaml", schema=MasterConfig
    )
    lora = load_config(LORA_RECIPE, schema=MasterConfig)
    assert full["policy"]["lora"] is None
    assert lora["policy"]["lora"] == {
        "rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"
    }  # fmt: skip
    assert lora["cluster"]["num_nodes"] == 1 and lora["cluster"]["gpus_per_node"] == 8
    lora_lr, full_lr = (config["policy"]["optimizer"]["kwargs"]["lr"] for config in (lora, full))
    assert lora_lr == pytest.approx(10 * full_lr)
    for key in ("model_name", "train_global_batch_size", "max_total_sequence_length", "fsdp"):
        assert lora["policy"][key] == full["policy"][key], key
    assert lora["dpo"] == full["dpo"] and lora["data"] == full["data"]
    assert lora["checkpointing"]["export_lora"] == "adapter"
