"""algorithms/ talks to a Policy: it imports neither Ray nor torch.distributed itself."""

import ast
from pathlib import Path

import pytest

ALGORITHMS = Path(__file__).resolve().parents[2] / "rl_toolkit" / "algorithms"
FORBIDDEN = ("ray", "torch.distributed")


def imported_modules(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.append(node.module)
            modules += [f"{node.module}.{alias.name}" for alias in node.names]
    return modules


@pytest.mark.parametrize("path", sorted(ALGORITHMS.glob("*.py")), ids=lambda p: p.name)
def test_algorithms_do_not_import_ray_or_torch_distributed(path: Path) -> None:
    bad = [
        m for m in imported_modules(path) if any(m == f or m.startswith(f"{f}.") for f in FORBIDDEN)
    ]
    assert not bad, f"{path.name} imports {bad}"


def test_the_check_sees_both_import_forms(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text(
        "import ray\nfrom torch import distributed\nfrom torch.distributed import fsdp\n"
    )
    assert {"ray", "torch.distributed", "torch.distributed.fsdp"} <= set(imported_modules(sample))


def test_only_the_vllm_worker_imports_vllm() -> None:
    # vLLM is an optional extra (`uv sync --extra vllm`): one module imports it, lazily.
    package = ALGORITHMS.parent
    importers = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if any(m == "vllm" or m.startswith("vllm.") for m in imported_modules(path))
    )
    assert importers == ["models/generation/vllm_worker.py"]
