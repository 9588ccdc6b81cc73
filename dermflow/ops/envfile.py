"""The `.env` file of dermflow's settings: reading it, and writing the keys `make up` fills in.

`make up` (`dermflow up`) writes the embedded stack's addresses and fresh random secrets for
every key the file lacks, never overwriting one; `dermflow.settings` reads it.
"""

from __future__ import annotations

import os
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


def default_env_values(s3_port: int = 8333, prefect_port: int = 4200) -> dict[str, str]:
    """What `make up` writes for keys the `.env` lacks: the embedded stack, fresh random keys."""
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
    }


def ensure_env_file(path: Path, defaults: dict[str, str]) -> list[str]:
    """Append every key of `defaults` that `path` (or the environment) lacks; keep the rest.

    A key already set in the process environment is not written: the environment wins, and
    writing it would pin today's value for tomorrow's shell. Returns the keys added.
    """
    existing = read_env_file(path)
    missing = [key for key in defaults if key not in existing and key not in os.environ]
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        if not path.exists() or not path.read_text().strip():
            lines.append("# dermflow settings: written by `make up` for missing keys, never overwritten.")
        lines += [f"{key}={defaults[key]}" for key in missing]
        prefix = "" if not path.exists() or path.read_text().endswith("\n") or not path.read_text() else "\n"
        with path.open("a") as handle:
            handle.write(prefix + "\n".join(lines) + "\n")
        path.chmod(0o600)  # it holds the S3 secret
    return missing
