"""The documentation names config files that exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted(REPO.glob("docs/**/*.md")) + [REPO / "README.md"]
CONFIG_PATH = re.compile(r"configs/[\w./-]+\.yaml")
# The configuration page's example of a recipe a user writes.
EXAMPLES = {"configs/recipes/my_run.yaml"}


def test_every_config_file_the_docs_name_exists() -> None:
    missing = [
        f"{doc.relative_to(REPO)}: {path}"
        for doc in DOCS
        for path in CONFIG_PATH.findall(doc.read_text())
        if path not in EXAMPLES and not (REPO / path).is_file()
    ]
    assert missing == []
