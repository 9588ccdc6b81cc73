"""What the benchmarks start for themselves: a SeaweedFS of their own, on free loopback ports,
with fresh keys, under the benchmark's temp dir (removed with it)."""

from __future__ import annotations

import secrets
from pathlib import Path


def bench_seaweed(work: Path):
    """A SeaweedFS (`dermflow.ops.stack.SeaweedServer`, not started yet) storing under `work`."""
    from dermflow.ops.stack import SeaweedServer, free_port_block

    return SeaweedServer(data_dir=work / "seaweed", s3_port=free_port_block(4),
                         access_key="bench-" + secrets.token_hex(4), secret_key=secrets.token_hex(16))
