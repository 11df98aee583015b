"""Hugging Face exports (rl_toolkit/utils/hf_export.py): the files, tied weights, shards, the
generation config, the config checks, and the upload to a local stand-in of the Hub."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.worker import PolicyWorker
from rl_toolkit.utils.config import ConfigError
from rl_toolkit.utils.hf_export import (
    check_hf_export_config,
    load_generation_config,
    parse_shard_size,
    push_to_hub,
    save_hf_model,
    tied_parameter_names,
)
from tests.conftest import WORKER_TIMEOUT_S
from tests.unit.policy_testing import (
    LOGPROB_MBS,
    TRAIN_MBS,
    make_batch,
    make_config,
    make_tokenizer,
    naive_logprobs,
    save_tiny_llama,
    token_nll_loss,
)

# The tiny Llama's largest tensors are 8 KB (fp32): this splits it into many shards.
SMALL_SHARDS = 20_000


def _export(model: LlamaForCausalLM, path: Path, **overrides) -> None:
    """save_hf_model as a worker calls it, from a state dict of separate copies per name (what a
    gather over several workers gives: tied names share no storage)."""
    kwargs = {
        "state_dict": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "tied_names": tied_parameter_names(model),
        "hf_config": model.config,
        "generation_config": GenerationConfig.from_model_config(model.config),
        "tokenizer": make_tokenizer(),
        "dtype": torch.float32,
        "max_shard_size": None,
    }
    save_hf_model(path, **{**kwargs, **overrides})


def _weight_names(path: Path) -> list[str]:
    names = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            names += list(f.keys())
    return names


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(tmp_path):
    model = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    assert tied_parameter_names(model) == ["lm_head.weight"]

    _export(model, tmp_path / "hf")

    names = _weight_names(tmp_path / "hf")
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    data = make_batch(seed=1)
    torch.testing.assert_close(
        naive_logprobs(loaded, data), naive_logprobs(model, data), atol=0, rtol=0
    )


def test_tensors_that_are_views_of_a_padded_buffer_are_saved(tmp_path):
    # What FSDP gathers for a dimension that does not divide by the workers (64 rows over 3):
    # each full tensor is a view of a larger, padded buffer, which safetensors refuses as is.
    model = save_tiny_llama(tmp_path / "model")
    state = {}
    for name, tensor in model.state_dict().items():
        padded = torch.zeros(tensor.numel() + 7)
        padded[: tensor.numel()] = tensor.reshape(-1)
        state[name] = padded[: tensor.numel()].view(tensor.shape)

    _export(model, tmp_path / "hf", state_dict=state)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(dict(loaded.state_dict()), dict(model.state_dict()), atol=0, rtol=0)


def test_untied_models_keep_their_lm_head(tmp_path):
    model = save_tiny_llama(tmp_path / "untied")
    assert tied_parameter_names(model) == []
    _export(model, tmp_path / "hf")
    assert "lm_head.weight" in _weight_names(tmp_path / "hf")


def test_a_small_max_shard_size_writes_shards_and_an_index_that_from_pretrained_loads(tmp_path):
    model = save_tiny_llama(tmp_path / "model")

    _export(model, tmp_path / "hf", max_shard_size=SMALL_SHARDS)

    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) >= 3 and "model.safetensors" not in shards
    assert all(p.stat().st_size <= SMALL_SHARDS for p in (tmp_path / "hf").glob("*.safetensors"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert sorted(index["weight_map"]) == sorted(model.state_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    data = make_batch(seed=2)
    torch.testing.assert_close(
        naive_logprobs(loaded, data), naive_logprobs(model, data), atol=0, rtol=0
    )


def test_without_max_shard_size_the_weights_are_one_file(tmp_path):
    model = save_tiny_llama(tmp_path / "model")
    _export(model, tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()


def test_weights_and_config_are_in_the_export_dtype(tmp_path):
    model = save_tiny_llama(tmp_path / "model")
    _export(model, tmp_path / "hf", dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(
        loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16)
    )


def test_generation_config_is_the_models_own_else_derived_from_its_config(tmp_path):
    model = save_tiny_llama(tmp_path / "model")
    own = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[1, 5])
    own.save_pretrained(tmp_path / "model")

    _export(
        model,
        tmp_path / "hf",
        generation_config=load_generation_config(str(tmp_path / "model"), model.config),
    )

    exported = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (exported.temperature, exported.top_p, exported.eos_token_id) == (0.6, 0.9, [1, 5])

    (tmp_path / "model" / "generation_config.json").unlink()
    derived = load_generation_config(str(tmp_path / "model"), model.config)
    assert derived.pad_token_id == model.config.pad_token_id == 0


@pytest.mark.parametrize(
    ("size", "num_bytes"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("0.5 gb", 5 * 10**8), ("20KB", 20_000)],
)
def test_parse_shard_size(size, num_bytes):
    assert parse_shard_size(size) == num_bytes


@pytest.mark.parametrize("size", ["5G", "GB", "0MB", "-1GB", "5 GiB", ""])
def test_parse_shard_size_rejects(size):
    with pytest.raises(ConfigError, match=r"^checkpointing.hf_max_shard_size: expected a size"):
        parse_shard_size(size)


def _checkpointing(**overrides) -> dict:
    config = {
        "enabled": True,
        "save_hf": True,
        "hf_max_shard_size": "5GB",
        "push_to_hub": "org/tiny-dpo",
        "hub_private": True,
    }
    return {**config, **overrides}


def test_push_to_hub_needs_save_hf_a_repo_id_and_a_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    check_hf_export_config(_checkpointing())
    check_hf_export_config(_checkpointing(save_hf=False, push_to_hub=None))
    for bad in (_checkpointing(save_hf=False), _checkpointing(enabled=False)):
        with pytest.raises(
            ConfigError, match="needs checkpointing.enabled: true and checkpointing.save_hf: true"
        ):
            check_hf_export_config(bad)
    with pytest.raises(ConfigError, match="'org/bad name' is not a repo id"):
        check_hf_export_config(_checkpointing(push_to_hub="org/bad name"))
    with pytest.raises(ConfigError, match="hf_max_shard_size"):
        check_hf_export_config(_checkpointing(hf_max_shard_size="lots"))

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", "/nonexistent/token")
    with pytest.raises(ConfigError, match="needs a Hugging Face token: set HF_TOKEN"):
        check_hf_export_config(_checkpointing())


def test_push_to_hub_uploads_every_file_of_the_export(tmp_path, hub):
    model = save_tiny_llama(tmp_path / "model")
    export = tmp_path / "step_3" / "hf"
    _export(model, export, max_shard_size=SMALL_SHARDS)

    url = push_to_hub(export, "org/tiny-dpo", private=True)

    assert hub.repos["org/tiny-dpo"]["visibility"] == "private"
    expected = {p.name: p.read_bytes() for p in export.iterdir()}
    assert hub.files["org/tiny-dpo"] == expected
    assert hub.lfs_paths["org/tiny-dpo"] == {n for n in expected if n.endswith(".safetensors")}
    assert hub.commits == [("org/tiny-dpo", "rl_toolkit: upload step_3")]
    assert url.startswith(f"{hub.url}/org/tiny-dpo/commit/")
    assert hub.authorizations == {"Bearer hf_standin_token"}
    assert hub.unexpected == []

    # A second upload goes to the repo that now exists (the Hub answers 409 to its creation).
    (export / "notes.txt").write_text("step 3 of a tiny run\n")
    push_to_hub(export, "org/tiny-dpo", private=True)
    assert hub.files["org/tiny-dpo"]["notes.txt"] == b"step 3 of a tiny run\n"
    assert len(hub.commits) == 2 and hub.unexpected == []


@pytest.mark.slow  # starts a two-worker policy: 30-60 s on the shared 2-core machine
@pytest.mark.usefixtures("ray_session")
def test_two_workers_export_tied_sharded_weights_that_give_the_policys_logprobs(tmp_path):
    save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    cluster = RayVirtualCluster([2], use_gpus=False, name="hf-export-2w")
    policy = Policy(
        cluster,
        make_config(tmp_path / "tied"),
        make_tokenizer(),
        init_optimizer=True,
        init_reference_model=True,
        worker_timeout_s=WORKER_TIMEOUT_S,
        worker_env_vars=[],
    )
    try:
        data = make_batch(seed=3)
        policy.train(data, token_nll_loss, TRAIN_MBS)
        expected = policy.logprobs(data, LOGPROB_MBS)["logprobs"]
        policy.workers.all(
            PolicyWorker.export_hf, str(tmp_path / "hf"), max_shard_size=SMALL_SHARDS
        )
    finally:
        policy.shutdown()
        cluster.shutdown()

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert len(set(index["weight_map"].values())) >= 3
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(naive_logprobs(loaded, data), expected, atol=1e-5, rtol=0)
