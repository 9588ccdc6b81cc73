"""Code-shape rules that hold the architecture in place: the import contracts (layers, and no
Prefect in the core), and bucket keys spelled only by `dermflow.layout`."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("dermflow", "tasks", "flows")
KEY_PREFIXES = ("images/", "manifests/", "runs/", "registry/", "tuning/", "private/", "config/")
LAYOUT = ROOT / "dermflow" / "layout.py"


def _lint_imports() -> list[str]:
    executable = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert executable, "lint-imports (import-linter, a dev dependency) is not installed"
    return [executable, "--config", str(ROOT / "pyproject.toml"), "--no-cache"]


def test_import_contracts_are_kept():
    result = subprocess.run(_lint_imports(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_contracts_catch_a_violation(tmp_path):
    """The linter does fail on a core module importing Prefect (so the test above can fail)."""
    offending = ROOT / "dermflow" / "dataset" / "_contract_probe.py"
    offending.write_text('"""Probe."""\nimport prefect  # noqa: F401\n')
    try:
        result = subprocess.run(_lint_imports(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        offending.unlink()
    assert result.returncode != 0 and "dermflow.dataset._contract_probe" in result.stdout


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def key_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal (f-string parts included, docstrings excluded)
    that starts like a bucket key (`runs/...`, `images/...`): prose such as "a folder with
    images/" is not a key."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.startswith(KEY_PREFIXES):  # a key starts with its top-level prefix
                found.append((node.lineno, node.value))
    return found


def test_key_literal_finder_sees_plain_and_f_strings():
    source = 'def f(run_id, md5):\n    """runs/<id>/ in a docstring is prose."""\n    a = f"runs/{run_id}/x"\n    return "images/" + md5\n'
    assert [line for line, _ in key_literals(source)] == [3, 4]


def test_only_the_layout_module_spells_bucket_keys():
    offenders = []
    for directory in CODE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            if path == LAYOUT:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line}: {text!r}" for line, text in key_literals(path.read_text())]
    assert not offenders, "bucket keys spelled outside dermflow/layout.py:\n" + "\n".join(offenders)


# Modules that call boto3 on a bucket the user names (a dataset CSV, an archive, an S3 prefix of
# images), not on dermflow's own bucket: they handle that bucket's errors themselves.
OTHER_BUCKET_READERS = {"dermflow/ingestion/ingest.py", "dermflow/ingestion/spool.py", "dermflow/ingestion/archive.py"}


def test_only_the_storage_module_calls_boto3_on_the_bucket():
    """`ObjectStore` is the one place that talks to the bucket, so every error is classified
    there (`storage.s3_error`): elsewhere, `store.client.<call>` would bypass it."""
    offenders = []
    for directory in CODE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            if name == "dermflow/storage.py" or name in OTHER_BUCKET_READERS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "client" \
                        and isinstance(node.value.value, (ast.Name, ast.Attribute)) and "store" in ast.unparse(node.value.value):
                    offenders.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "boto3 called on the bucket outside dermflow/storage.py:\n" + "\n".join(offenders)
