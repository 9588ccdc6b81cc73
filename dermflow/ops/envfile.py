"""The `.env` file of dermflow's settings: reading it, and writing the keys `make up` fills in.

`make up` (`dermflow up`) writes every settings key the file lacks, never overwriting one: the
embedded stack's addresses and fresh random secrets, every other setting with its default, and
settings whose default is empty commented out (`# DERMFLOW_GPU_SLOTS=`), so the file lists
everything one can set; `dermflow.settings` reads it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dermflow.ops.stack import StackError


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a `.env` file (comments and blank lines skipped, quotes removed)."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        if "=" not in line:
            raise StackError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


class Commented(str):
    """A default written commented out, its value shown (`# DERMFLOW_DATA_DIR=/path`): a path
    under the project would break if the checkout moved, so it is not pinned."""


_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]*$")
_COMMENTED_KEY = re.compile(r"^#\s*(?:export\s+)?([A-Z][A-Z0-9_]*)=")


def commented_keys(path: Path) -> set[str]:
    """Keys present but commented out (`# KEY=...`): written before with an empty default."""
    if not path.exists():
        return set()
    return {match.group(1) for line in path.read_text().splitlines()
            if (match := _COMMENTED_KEY.match(line.strip()))}


def settings_env_defaults() -> dict[str, str | None]:
    """Every setting's environment name and its default as `.env` spells it; None when the
    default is empty (no value: the setting is off or derived)."""
    from pydantic import AliasChoices, SecretStr

    from dermflow.settings import PROJECT_ROOT, Settings

    prefix = Settings.model_config.get("env_prefix", "")
    values: dict[str, str | None] = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        key = alias.choices[0] if isinstance(alias, AliasChoices) else f"{prefix}{name}".upper()
        default = field.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if isinstance(default, bool):
            default = str(default).lower()
        if isinstance(default, Path) and default.is_relative_to(PROJECT_ROOT):
            values[str(key)] = Commented(default)
        else:
            values[str(key)] = None if default is None or default == "" else str(default)
    return values


def env_line(key: str, value: str | None) -> str:
    """`KEY=value` (single-quoted unless shell-safe, so `source .env` works too); `# KEY=` for
    None, `# KEY=value` for a `Commented` value."""
    if value is None:
        return f"# {key}="
    text = value if _SHELL_SAFE.match(value) else "'" + value.replace("'", "'\\''") + "'"
    return f"# {key}={text}" if isinstance(value, Commented) else f"{key}={text}"


def default_env_values(s3_port: int = 8333, prefect_port: int = 4200) -> dict[str, str | None]:
    """What `make up` writes for keys the `.env` lacks: every setting (None: commented out, its
    default is empty), with the embedded stack's addresses and fresh random keys."""
    return {**settings_env_defaults(), **_stack_values(s3_port, prefect_port)}


def _stack_values(s3_port: int, prefect_port: int) -> dict[str, str]:
    import secrets

    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "dermflow-" + secrets.token_hex(6),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "AWS_DEFAULT_REGION": "us-east-1",
        "DERMFLOW_BUCKET": "dermflow",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        # The embedded Prefect server's basic auth (user "dermflow"), used by every client.
        "PREFECT_API_AUTH_STRING": "dermflow:" + secrets.token_urlsafe(24),
        "DERMFLOW_ALLOWED_HOSTS": "",
        "DERMFLOW_S3_PORT": str(s3_port),
        "DERMFLOW_PREFECT_PORT": str(prefect_port),
    }


def ensure_env_file(path: Path, defaults: dict[str, str | None]) -> list[str]:
    """Append every key of `defaults` that `path` (or the environment) lacks; keep the rest. A
    key whose value is None or `Commented` is written commented out (`# KEY=`), and counts as
    present after.

    A key already set in the process environment is not written: the environment wins, and
    writing it would pin today's value for tomorrow's shell. Returns the keys added.
    """
    existing = set(read_env_file(path)) | commented_keys(path)
    missing = [key for key in defaults if key not in existing and key not in os.environ]
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        if not path.exists() or not path.read_text().strip():
            lines.append("# dermflow settings: written by `make up` for missing keys, never overwritten.")
        lines += [env_line(key, defaults[key]) for key in missing]
        prefix = "" if not path.exists() or path.read_text().endswith("\n") or not path.read_text() else "\n"
        with path.open("a") as handle:
            handle.write(prefix + "\n".join(lines) + "\n")
        path.chmod(0o600)  # it holds the S3 secret
    return missing
