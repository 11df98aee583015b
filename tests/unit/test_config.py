"""Config loading: inheritance, overrides, validation errors, writing."""

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import pytest
import yaml

from rl_toolkit.utils.config import (
    ConfigError,
    load_config,
    load_yaml_with_defaults,
    parse_cli,
    save_config,
)


class WandbSchema(TypedDict):
    project: str
    name: str | None


class LoggerSchema(TypedDict):
    wandb_enabled: bool
    wandb: WandbSchema


class DPOSchema(TypedDict):
    sft_loss_weight: float
    max_num_steps: int
    loss_type: Literal["sigmoid", "ipo"]
    milestones: list[int]
    seed: NotRequired[int]


class Schema(TypedDict):
    dpo: DPOSchema
    logger: LoggerSchema
    extra: dict[str, Any] | None


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(
        tmp_path / "base.yaml",
        """
        dpo:
          sft_loss_weight: 0.0
          max_num_steps: 10
          loss_type: sigmoid
          milestones: [1, 2, 3]
        logger:
          wandb_enabled: false
          wandb:
            project: base-project
            name: null
        extra: null
        """,
    )


def test_three_level_inheritance_child_wins(tmp_path: Path, base: Path) -> None:
    write(
        tmp_path / "mid.yaml",
        "defaults: base.yaml\ndpo:\n  max_num_steps: 20\n  sft_loss_weight: 0.5\n",
    )
    leaf = write(
        tmp_path / "recipes" / "leaf.yaml",
        "defaults: ../mid.yaml\ndpo:\n  max_num_steps: 30\nlogger:\n  wandb:\n    name: leaf-run\n",
    )
    cfg = load_config(leaf, schema=Schema)
    assert cfg["dpo"]["max_num_steps"] == 30  # leaf beats mid beats base
    assert cfg["dpo"]["sft_loss_weight"] == 0.5  # from mid
    assert cfg["dpo"]["loss_type"] == "sigmoid"  # from base
    assert cfg["logger"]["wandb"] == {"project": "base-project", "name": "leaf-run"}
    assert "defaults" not in cfg


def test_sources_name_the_file_that_set_each_key(tmp_path: Path, base: Path) -> None:
    leaf = write(tmp_path / "leaf.yaml", "defaults: base.yaml\ndpo:\n  max_num_steps: 30\n")
    loaded = load_yaml_with_defaults(leaf)
    assert loaded.sources["dpo.max_num_steps"] == str(leaf)
    assert loaded.sources["dpo.loss_type"] == str(base)


def test_defaults_list_merges_left_to_right(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "x: 1\ny: 1\n")
    write(tmp_path / "b.yaml", "y: 2\nz: 2\n")
    leaf = write(tmp_path / "leaf.yaml", "defaults: [a.yaml, b.yaml]\nz: 3\n")
    assert load_config(leaf) == {"x": 1, "y": 2, "z": 3}


def test_lists_are_replaced_not_merged(tmp_path: Path, base: Path) -> None:
    leaf = write(tmp_path / "leaf.yaml", "defaults: base.yaml\ndpo:\n  milestones: [7]\n")
    assert load_config(leaf, schema=Schema)["dpo"]["milestones"] == [7]
    assert load_config(leaf, ["dpo.milestones=[4,5]"])["dpo"]["milestones"] == [4, 5]


def test_null_in_file_and_override(tmp_path: Path, base: Path) -> None:
    leaf = write(tmp_path / "leaf.yaml", "defaults: base.yaml\nlogger:\n  wandb:\n    name: x\n")
    assert (
        load_config(leaf, ["logger.wandb.name=null"], schema=Schema)["logger"]["wandb"]["name"]
        is None
    )
    assert load_config(base, ["extra=null"], schema=Schema)["extra"] is None


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("dpo.sft_loss_weight=0.1", "sft_loss_weight", 0.1),
        ("dpo.sft_loss_weight=1", "sft_loss_weight", 1),  # an int is a valid float
        ("dpo.sft_loss_weight=1e-3", "sft_loss_weight", 1e-3),
        ("dpo.max_num_steps=8", "max_num_steps", 8),
        ("dpo.loss_type=ipo", "loss_type", "ipo"),
        ("dpo.loss_type='ipo'", "loss_type", "ipo"),
        ("dpo.milestones=[1,2]", "milestones", [1, 2]),
        ("dpo.milestones=[]", "milestones", []),
    ],
)
def test_scalar_and_list_overrides(base: Path, override: str, key: str, expected: Any) -> None:
    value = load_config(base, [override], schema=Schema)["dpo"][key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [("true", True), ("false", False), ("True", True), ("False", False)],
)
def test_boolean_overrides(base: Path, override: str, expected: bool) -> None:
    cfg = load_config(base, [f"logger.wandb_enabled={override}"], schema=Schema)
    assert cfg["logger"]["wandb_enabled"] is expected


def test_string_overrides_with_quotes_and_dashes(base: Path) -> None:
    cfg = load_config(base, ['logger.wandb.name="dpo-dev"'], schema=Schema)
    assert cfg["logger"]["wandb"]["name"] == "dpo-dev"
    cfg = load_config(base, ["logger.wandb.name=dpo-dev-8-gpu"], schema=Schema)
    assert cfg["logger"]["wandb"]["name"] == "dpo-dev-8-gpu"


def test_override_can_set_a_mapping_where_null_was(base: Path) -> None:
    cfg = load_config(base, ["extra.lr=0.5", "extra.name=x"], schema=Schema)
    assert cfg["extra"] == {"lr": 0.5, "name": "x"}


def test_interpolation_is_resolved(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "a:\n  b: 4\nc: ${a.b}\n")
    assert load_config(path, ["a.b=9"]) == {"a": {"b": 9}, "c": 9}


def test_typo_in_override_names_key_source_and_suggestion(base: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(base, ["dpo.sft_los_weight=0.1"], schema=Schema)
    message = str(err.value)
    assert "unknown key 'dpo.sft_los_weight'" in message
    assert "the command line" in message
    assert "did you mean 'dpo.sft_loss_weight'" in message
    assert len(message.splitlines()) == 1  # one line, no wall


def test_typo_in_file_names_the_file(tmp_path: Path, base: Path) -> None:
    leaf = write(tmp_path / "leaf.yaml", "defaults: base.yaml\nlogger:\n  wandb_enabeld: true\n")
    with pytest.raises(
        ConfigError, match=r"'logger.wandb_enabeld' \(from .*leaf.yaml\).*'logger.wandb_enabled'"
    ):
        load_config(leaf, schema=Schema)


def test_unknown_key_without_close_match_lists_valid_keys(base: Path) -> None:
    with pytest.raises(ConfigError, match="valid keys here: loss_type, max_num_steps, milestones"):
        load_config(base, ["dpo.zzz=1"], schema=Schema)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (
            "dpo.max_num_steps=ten",
            "'dpo.max_num_steps': input should be a valid integer, got str 'ten'",
        ),
        (
            "dpo.max_num_steps=1.5",
            "'dpo.max_num_steps': input should be a valid integer, got float 1.5",
        ),
        ("dpo.max_num_steps=true", "got bool True"),
        ("dpo.sft_loss_weight=abc", "'dpo.sft_loss_weight': input should be a valid number"),
        ("dpo.loss_type=hinge", "input should be 'sigmoid' or 'ipo', got str 'hinge'"),
        ("dpo.milestones=[1,x]", "'dpo.milestones'[1]: input should be a valid integer"),
        ("logger.wandb=5", "'logger.wandb' must be a mapping, got int 5"),
    ],
)
def test_wrong_type_names_key_value_and_source(base: Path, override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(base, [override], schema=Schema)
    assert fragment in str(err.value)
    assert "the command line" in str(err.value)


def test_wrong_type_in_file_names_the_file(tmp_path: Path, base: Path) -> None:
    leaf = write(tmp_path / "leaf.yaml", "defaults: base.yaml\ndpo:\n  max_num_steps: many\n")
    with pytest.raises(ConfigError, match=r"'dpo.max_num_steps'.*leaf.yaml"):
        load_config(leaf, schema=Schema)


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "dpo:\n  sft_loss_weight: 0.0\n  loss_type: ipo\n  milestones: []\n"
        "logger:\n  wandb_enabled: false\n  wandb: {project: p, name: n}\nextra: null\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, schema=Schema)
    assert "missing required key 'dpo.max_num_steps'" in str(err.value)
    assert "seed" not in str(err.value)  # NotRequired keys may be absent


def test_all_problems_reported_at_once(base: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(base, ["dpo.max_num_steps=x", "dpo.sft_los_weight=1"], schema=Schema)
    assert "dpo.max_num_steps" in str(err.value) and "dpo.sft_los_weight" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_missing_parent_names_child_and_parent(tmp_path: Path) -> None:
    leaf = write(tmp_path / "leaf.yaml", "defaults: gone.yaml\nx: 1\n")
    with pytest.raises(ConfigError, match=r"leaf.yaml: 'defaults' names 'gone.yaml'"):
        load_config(leaf)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "a: 1\nb:\n  c: [1, 2\n  d: 3\n")
    with pytest.raises(ConfigError, match=r"Malformed YAML in .*bad.yaml, line \d+, column \d+"):
        load_config(path)
    path = write(tmp_path / "tabs.yaml", "a: 1\n\tb: 2\n")
    with pytest.raises(ConfigError, match=r"tabs.yaml, line 2"):
        load_config(path)


def test_inheritance_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "override", ["dpo.sft_loss_weight", "=1", "dpo..x=1", "dpo.max_num_steps.x=1"]
)
def test_bad_override_syntax(base: Path, override: str) -> None:
    with pytest.raises(ConfigError, match="Bad override"):
        load_config(base, [override])


def test_save_config_round_trips(tmp_path: Path, base: Path) -> None:
    cfg = load_config(base, ["dpo.milestones=[9]"], schema=Schema)
    out = tmp_path / "out" / "config.yaml"
    save_config(cfg, out)
    assert yaml.safe_load(out.read_text()) == cfg
    assert list(yaml.safe_load(out.read_text())) == ["dpo", "logger", "extra"]  # order kept


def test_parse_cli() -> None:
    assert parse_cli(["a.b=1", "--config", "x.yaml"], "d.yaml", "") == ("x.yaml", ["a.b=1"])
    assert parse_cli([], "d.yaml", "") == ("d.yaml", [])


def test_cli_prints_one_message_and_exits_nonzero(tmp_path: Path, base: Path) -> None:
    script = write(
        tmp_path / "cli.py",
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_config import Schema
        from rl_toolkit.utils.config import run_cli_with_config
        run_cli_with_config(lambda cfg: print("ran"), sys.argv[1:], {str(base)!r}, "test", Schema)
        """,
    )
    bad = subprocess.run(
        [sys.executable, str(script), "dpo.sft_los_weight=0.1"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "did you mean 'dpo.sft_loss_weight'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 3
    good = subprocess.run(
        [sys.executable, str(script), "dpo.sft_loss_weight=0.1"], capture_output=True, text=True
    )
    assert good.returncode == 0 and good.stdout.strip() == "ran"


class EntrySchema(TypedDict):
    name: str
    kwargs: NotRequired[dict[str, Any]]


class ListSchema(TypedDict):
    entries: list[EntrySchema]


def test_lists_of_sections_are_checked_entry_by_entry(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "entries:\n  - name: a\n  - name: b\n    kwargs: {x: 1}\n")
    assert load_config(path, schema=ListSchema)["entries"][1]["kwargs"] == {"x": 1}
    with pytest.raises(ConfigError) as err:
        load_config(path, ["entries=[{name: a, kwarg: {}}, {name: 3}]"], schema=ListSchema)
    message = str(err.value)
    assert (
        "unknown key 'entries[0].kwarg' (from the command line); did you mean 'entries[0].kwargs'?"
        in message
    )
    assert "'entries[1].name': input should be a valid string, got int 3" in message
