"""The one typed settings object of dermflow, read from the environment and `.env`.

The S3 keys are the standard `AWS_*` variables, so pointing dermflow at AWS S3, MinIO or a
SeaweedFS cluster needs configuration only. Everything else is prefixed `DERMFLOW_`.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def env_file_path() -> Path:
    """The `.env` dermflow reads and `make up` writes: `DERMFLOW_ENV_FILE`, else the project's."""
    return Path(os.environ.get("DERMFLOW_ENV_FILE", PROJECT_ROOT / ".env"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DERMFLOW_", extra="ignore", populate_by_name=True
    )

    # --- S3 (standard AWS variable names) ---
    aws_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL", "aws_endpoint_url")
    )
    aws_access_key_id: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "aws_access_key_id")
    )
    aws_secret_access_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key")
    )
    aws_default_region: str = Field(
        "us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "aws_default_region")
    )
    bucket: str = "dermflow"
    # Path style works with every S3-compatible server; AWS users may choose "virtual".
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"

    # --- Prefect ---
    prefect_api_url: str = Field(
        "http://127.0.0.1:4200/api",
        validation_alias=AliasChoices("PREFECT_API_URL", "prefect_api_url"),
    )
    # The Prefect server's basic auth, "user:password" (Prefect's own client variable, so the
    # workers, `prefect` commands and the UI's login all use the same one; `make up` makes it).
    prefect_api_auth_string: SecretStr | None = Field(
        None, validation_alias=AliasChoices("PREFECT_API_AUTH_STRING", "prefect_api_auth_string")
    )
    work_pool: str = "dermflow"
    # Training slots: the `gpu` global concurrency limit. None means "GPUs detected, else 1".
    gpu_slots: int | None = Field(None, ge=1)
    # How long a `gpu` slot's lease lasts unless its holder renews it (the holder renews it
    # every ~3/4 of it): a holder killed with SIGKILL frees its slot this long after, at most,
    # plus the server's repossessor interval (15 s). Prefect accepts 60 s to a day.
    gpu_lease_seconds: float = Field(120, ge=60, le=86400)

    # A webhook that hears about failed scheduled retrains (a Prefect automation, made by `up`).
    # A secret: stored in a Prefect block's secret field, never printed.
    alert_webhook: SecretStr | None = None

    # --- the embedded stack (make up) ---
    data_dir: Path = PROJECT_ROOT / ".dermflow"
    s3_port: int = Field(8333, ge=1, le=65535)
    prefect_port: int = Field(4200, ge=1, le=65535)

    # --- fetching ---
    # Hosts or CIDRs that may resolve to private/loopback addresses (SSRF guard exemptions).
    allowed_hosts: str = ""
    user_agent: str = "dermflow/0.1 (+https://github.com/dermflow/dermflow; research dataset fetcher)"

    # --- local caches and retention ---
    cache_dir: Path | None = None
    keep_runs: int = Field(20, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            if "/" in item:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError as error:
                    raise ValueError(f"DERMFLOW_ALLOWED_HOSTS: {item!r} is not a valid CIDR") from error
        return value

    @property
    def allowed_host_list(self) -> list[str]:
        return [part.strip() for part in self.allowed_hosts.split(",") if part.strip()]

    @property
    def local_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def embedded_endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


def load_settings(**overrides) -> Settings:
    """Settings from the environment, then `.env` (environment wins), then `overrides`."""
    return Settings(_env_file=env_file_path(), **overrides)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
