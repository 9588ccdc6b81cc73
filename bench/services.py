"""What the fetch benchmarks share: the atlas20 images they read, and a SeaweedFS of their own
(free loopback ports, fresh keys, under the benchmark's temp dir, removed with it)."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

ATLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "atlas20"


def atlas_is_absent() -> bool:
    """True, said on stderr, where ../shared/data/atlas20 is absent: the benchmarks need it."""
    if (ATLAS / "rows.csv").exists():
        return False
    print(f"{ATLAS} is absent: the benchmark needs ../shared/data/atlas20", file=sys.stderr)
    return True


def bench_seaweed(work: Path):
    """A SeaweedFS (`dermflow.ops.stack.SeaweedServer`, not started yet) storing under `work`."""
    from dermflow.ops.stack import SeaweedServer, free_port_block

    return SeaweedServer(data_dir=work / "seaweed", s3_port=free_port_block(4),
                         access_key="bench-" + secrets.token_hex(4), secret_key=secrets.token_hex(16))
