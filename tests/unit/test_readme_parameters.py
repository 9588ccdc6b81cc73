"""README.md's parameter table is the one generated from `dermflow.config` (issue 15): a
changed default or description fails here until `python -m dermflow.ops.docs` is run."""

from __future__ import annotations

import pytest

from dermflow.config import RUN_DEFAULTS
from dermflow.ops import docs

pytestmark = pytest.mark.unit


def test_readme_parameter_table_is_the_generated_one():
    text = docs.README.read_text()
    assert docs.render_readme(text) == text, "README.md's parameter table is stale: run python -m dermflow.ops.docs"


def test_the_table_has_every_parameter_and_follows_a_change(tmp_path):
    table = docs.parameter_table()
    for name in RUN_DEFAULTS:
        assert f"| `{name}` |" in table
    assert "| `image_size` | `256` |" in table and "| `limit_per_label` | `null` |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{docs.BEGIN}\n| old | table |\n{docs.END}\nrest\n")
    assert docs.main(["--check", "--readme", str(readme)]) == 1
    assert docs.main(["--readme", str(readme)]) == 0 and docs.main(["--check", "--readme", str(readme)]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith(f"{docs.END}\nrest\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        docs.main(["--check", "--readme", str(readme)])
