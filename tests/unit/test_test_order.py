"""The suite's own collection order (tests/conftest.py): the modules that use Ray first."""

from pathlib import Path
from types import SimpleNamespace

from tests.conftest import pytest_collection_modifyitems


def fake_item(path: str, *fixtures: str) -> SimpleNamespace:
    return SimpleNamespace(
        path=Path(path),
        fixturenames=list(fixtures),
        get_closest_marker=lambda name: None,
        add_marker=lambda marker: None,
    )


def test_modules_that_use_ray_go_first_in_file_order_and_keep_their_own_order() -> None:
    items = [
        fake_item("a.py", "tmp_path"),
        fake_item("b.py"),
        fake_item("b.py", "ray_session"),  # one test is enough to move its module
        fake_item("c.py"),
        fake_item("d.py", "ray_head"),
        fake_item("d.py"),
    ]
    names = {id(item): f"{item.path}:{i}" for i, item in enumerate(items)}
    pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [names[id(item)] for item in items] == ["b.py:1", "b.py:2", "d.py:4", "d.py:5",
                                                   "a.py:0", "c.py:3"]  # fmt: skip
