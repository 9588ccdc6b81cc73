"""A whole dermflow stack for end-to-end tests: `dermflow up` on free ports in a temp dir.

Real SeaweedFS, a real Prefect server, the real workers and deployments; torn down with
`dermflow down`. Nothing touches the developer's own stack, `.env` or Prefect profiles.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dermflow.ops.stack import free_port_block

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    env: dict[str, str]
    data_dir: Path

    def run(self, *argv: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), env=self.env, cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def dermflow(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dermflow.ops.cli", *args, **kwargs)

    def prefect(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "prefect", *args, **kwargs)

    def prefect_client(self):
        """An async PrefectClient of the stack's API, with its auth string."""
        from prefect.client.orchestration import PrefectClient

        return PrefectClient(self.env["PREFECT_API_URL"], auth_string=self.env["PREFECT_API_AUTH_STRING"])

    def store(self):
        from dermflow.settings import Settings
        from dermflow.storage import ObjectStore

        return ObjectStore.from_settings(Settings(
            AWS_ENDPOINT_URL=self.env["AWS_ENDPOINT_URL"], AWS_ACCESS_KEY_ID=self.env["AWS_ACCESS_KEY_ID"],
            AWS_SECRET_ACCESS_KEY=self.env["AWS_SECRET_ACCESS_KEY"], bucket=self.env["DERMFLOW_BUCKET"]))


def start_stack(data_dir: Path, gpu_slots: int = 1, extra_env: dict[str, str] | None = None) -> Stack:
    s3_port = free_port_block(4)
    prefect_port = free_port_block(1, start=41000, stop=49000)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "DERMFLOW_"))}
    env.update({
        "DERMFLOW_DATA_DIR": str(data_dir),
        "DERMFLOW_ENV_FILE": str(data_dir / ".env"),
        "DERMFLOW_S3_PORT": str(s3_port),
        "DERMFLOW_PREFECT_PORT": str(prefect_port),
        "DERMFLOW_GPU_SLOTS": str(gpu_slots),
        "DERMFLOW_ALLOWED_HOSTS": "127.0.0.1",
        "DERMFLOW_BUCKET": "dermflow-e2e",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "e2e-" + secrets.token_hex(4),
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_API_AUTH_STRING": "e2e:" + secrets.token_urlsafe(16),  # the server's basic auth
        "PREFECT_HOME": str(data_dir / "prefect-home"),  # profiles of the test, not the user's
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # workers pick runs up within 2 s (default 10)
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(extra_env or {}),
    })
    stack = Stack(env, data_dir)
    try:
        stack.dermflow("up", timeout=600)
    except AssertionError as error:
        # On a loaded machine a cold Prefect server can take longer than `up` waits; it keeps
        # starting, and `up` is idempotent: wait once more. Otherwise stop what was started.
        if "not answering after" not in str(error) or stack.dermflow("up", timeout=600, check=False).returncode:
            stack.dermflow("down", timeout=180, check=False)
            raise
    return stack


class WebhookReceiver:
    """A local HTTP server that records the JSON bodies POSTed to it (alert notifications)."""

    def __init__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
