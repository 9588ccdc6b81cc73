"""The one typed settings object of dermflow, read from the environment and `.env`.

The S3 keys are the standard `AWS_*` variables, so pointing dermflow at AWS S3, MinIO or a
SeaweedFS cluster needs configuration only. Everything else is prefixed `DERMFLOW_`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dermflow.errors import DermflowError


def project_root(environ=None, package_dir: Path | None = None, cwd: Path | None = None) -> Path:
    """Where `.env` and the embedded stack's data (`.dermflow/`) live, by one rule:

    1. `DERMFLOW_PROJECT_ROOT`, when set;
    2. else the source checkout the package was imported from (a folder with `pyproject.toml`
       above `dermflow/`: a clone, or an editable install);
    3. else the current working directory: an installed (non-editable) package never points
       into site-packages. Run `dermflow` from the folder that holds your `.env`, or set
       `DERMFLOW_PROJECT_ROOT`. (Deployments' pull step keeps a worker's folder for its flow
       runs: `dermflow.ops.steps.use_installed_flows`.)
    """
    environ = os.environ if environ is None else environ
    if environ.get("DERMFLOW_PROJECT_ROOT"):
        return Path(environ["DERMFLOW_PROJECT_ROOT"]).expanduser().resolve()
    source = (package_dir or Path(__file__).resolve().parent).parent
    if (source / "pyproject.toml").is_file() and (source / "dermflow" / "__init__.py").is_file():
        return source
    return (cwd or Path.cwd()).resolve()


PROJECT_ROOT = project_root()

AllowedNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# Allowing a network wider than these (e.g. 0.0.0.0/0) is turning the SSRF guard off; it needs
# DERMFLOW_ALLOW_ANY_HOST=true. 10.0.0.0/8 and fc00::/7, the widest private ranges, pass.
_WIDEST_ALLOWED_PREFIX = {4: 8, 6: 7}


def parse_allowed_host(entry: str) -> str | AllowedNetwork:
    """One `DERMFLOW_ALLOWED_HOSTS` entry -> a lower-case host name, or an IP network (an address
    is a /32 or /128). Raises ValueError naming the entry: wildcards, spaces, a mistyped
    address (`127.0.0.l`) and a CIDR with host bits set (`10.0.0.5/8`) are refused, not guessed at."""
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        if "/" in text:
            if "host bits set" in str(error):
                network = ipaddress.ip_network(text, strict=False)
                address = text.split("/", 1)[0]
                raise ValueError(f"DERMFLOW_ALLOWED_HOSTS: {text!r} has host bits set; write {network} for the "
                                 f"network or {address}/{network.max_prefixlen} for one address") from None
            raise ValueError(f"DERMFLOW_ALLOWED_HOSTS: {text!r} is not a valid CIDR (nor a host name, "
                             "which has no '/')") from None
    name = text.lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"DERMFLOW_ALLOWED_HOSTS: {text!r} is not a host name, an IP address or a CIDR "
                         "(entries are comma-separated; wildcards are not supported)")
    if len(labels) > 1 and all(label.isdigit() for label in labels[:-1]):
        raise ValueError(f"DERMFLOW_ALLOWED_HOSTS: {text!r} looks like a mistyped IP address")
    return name


def allowed_host_entries(value: str) -> list[str]:
    """The comma-separated entries of a `DERMFLOW_ALLOWED_HOSTS` value, stripped, blanks dropped."""
    return [part.strip() for part in value.split(",") if part.strip()]


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
    # Temporary credentials (STS, SSO exports) come with a session token; both S3 clients get it.
    aws_session_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("AWS_SESSION_TOKEN", "aws_session_token")
    )
    aws_default_region: str = Field(
        "us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "aws_default_region")
    )
    bucket: str = "dermflow"
    # Path style works with every S3-compatible server; AWS users may choose "virtual".
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    # The client of the bulk S3 calls (the fetcher's and importer's image puts, the listing of
    # stored images): obstore costs a sixth of boto3's CPU per put and a twentieth per listed key,
    # and frees the GIL while it waits (dermflow.storage.BulkCalls);
    # "boto3" for an endpoint only boto3 reaches (e.g. a CA bundle or proxy set up for botocore
    # alone). DERMFLOW_IMAGE_PUT_CLIENT is its former name.
    bulk_s3_client: Literal["obstore", "boto3"] = Field(
        "obstore", validation_alias=AliasChoices("DERMFLOW_BULK_S3_CLIENT", "DERMFLOW_IMAGE_PUT_CLIENT",
                                                 "bulk_s3_client"))

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
    # Lets `allowed_hosts` hold a network wider than /8 (IPv4) or /7 (IPv6), e.g. 0.0.0.0/0:
    # that turns the SSRF guard off, so it must be asked for by name.
    allow_any_host: bool = False
    user_agent: str = "dermflow/0.1 (+https://github.com/dermflow/dermflow; research dataset fetcher)"

    # --- distributed tuning (tune_workers > 1) ---
    # The address the tuning chief's oracle binds to and advertises to its workers: an address of
    # the host that runs `derm` (the orchestration worker) that every `gpu` worker can reach.
    # 127.0.0.1 serves workers on the same host only.
    tuning_oracle_host: str = Field("127.0.0.1", min_length=1)

    # --- local caches and retention ---
    cache_dir: Path | None = None
    keep_runs: int = Field(20, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: str) -> str:
        for entry in allowed_host_entries(value):
            parse_allowed_host(entry)
        return value

    @model_validator(mode="after")
    def _check_allowed_width(self) -> Settings:
        if self.allow_any_host:
            return self
        for entry in allowed_host_entries(self.allowed_hosts):
            parsed = parse_allowed_host(entry)
            if not isinstance(parsed, str) and parsed.prefixlen < _WIDEST_ALLOWED_PREFIX[parsed.version]:
                raise ValueError(f"DERMFLOW_ALLOWED_HOSTS: {entry!r} allows {parsed.num_addresses} addresses, "
                                 "which turns the SSRF guard off; allow the hosts you trust, or set "
                                 "DERMFLOW_ALLOW_ANY_HOST=true if that is really meant")
        return self

    @property
    def allowed_host_list(self) -> list[str]:
        return allowed_host_entries(self.allowed_hosts)

    @property
    def local_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def embedded_endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


class SettingsError(DermflowError):
    """A setting in the environment or `.env` is invalid (permanent: the user must fix it)."""


def load_settings(**overrides) -> Settings:
    """Settings from the environment, then `.env` (environment wins), then `overrides`.
    An invalid value is a `SettingsError` naming the setting (its value is not echoed)."""
    try:
        return Settings(_env_file=env_file_path(), **overrides)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                             for e in error.errors(include_input=False))
        raise SettingsError(f"invalid setting(s) in the environment or {env_file_path()}: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
