"""The quality measurement of the tuning issue, through the real deployment.

Holds out the same 20 % of atlas20 as `bench_quality.py` (seed 0, stratified by condition),
serves the other 80 % from a local HTTP server, runs

    prefect deployment run derm/full -p csv=<the 80 %> -p image_size=128 -p weights=none \\
        -p tune=true -p budget_minutes=15 -p architectures='["baseline_cnn"]' --watch

on the stack of `make up` (with DERMFLOW_ALLOWED_HOSTS=127.0.0.1), then scores that run with
`dermflow evaluate --model <run> --csv <held-out rows> --images <atlas20 images> --json` and
prints its weighted F1 beside the report recipe's (from `bench_quality.py --recipe report`,
given with --report-f1 or read from its JSON output).

    .venv/bin/python bench/bench_quality_deployment.py [--budget-minutes 15] [--report-json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
ATLAS_DIR = PROJECT_ROOT.parent / "shared" / "data" / "atlas20"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-minutes", type=float, default=15)
    parser.add_argument("--report-json", type=Path, help="output of bench_quality.py --recipe report --out")
    parser.add_argument("--report-f1", type=float, help="the report recipe's held-out weighted F1")
    args = parser.parse_args()

    import pandas as pd

    from bench.bench_quality import fixed_split
    from tests.support.image_servers import rewrite_csv_host, serve_atlas

    work = Path(tempfile.mkdtemp(prefix="dermflow-quality-"))
    rows = pd.read_csv(ATLAS_DIR / "rows.csv", dtype=str, keep_default_na=False)
    # The in-process bench's grouped split: held out = its test rows; the pipeline gets only its
    # train and val rows (not the excluded near-duplicates of held-out diagnostic rows).
    split = fixed_split(rows, ATLAS_DIR).set_index("md5hash")["split"]
    where = rows["md5hash"].map(split)
    rows[where.isin(["train", "val"])].to_csv(work / "train_rows.csv", index=False)
    held_out = rows[where == "test"]
    held_out.to_csv(work / "held_out.csv", index=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bin_dir = Path(sys.executable).parent
    with serve_atlas(ATLAS_DIR / "images", ATLAS_DIR / "rows.csv") as server:
        csv_path = rewrite_csv_host(work / "train_rows.csv", server.base_url, work / "train_served.csv")
        started = time.monotonic()
        run = subprocess.run(
            [str(bin_dir / "prefect"), "deployment", "run", "derm/full", "-p", f"csv={csv_path}",
             "-p", "image_size=128", "-p", "weights=none", "-p", "tune=true",
             "-p", f"budget_minutes={args.budget_minutes}", "-p", 'architectures=["baseline_cnn"]', "--watch"],
            capture_output=True, text=True, env=env, cwd=PROJECT_ROOT,
        )
        wall = time.monotonic() - started
    if run.returncode != 0:
        print(run.stdout[-5000:], run.stderr[-3000:])
        return 1
    name = re.search(r"Created flow run '([^']+)'", run.stdout)
    flow_run_name = name.group(1) if name else None
    evaluate = subprocess.run(
        [str(bin_dir / "dermflow"), "evaluate", "--csv", str(work / "held_out.csv"),
         "--images", str(ATLAS_DIR / "images"), "--json"] + (["--model", flow_run_name] if flow_run_name else []),
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, check=True,
    )
    tuned = json.loads(evaluate.stdout)
    report_f1 = args.report_f1
    if report_f1 is None and args.report_json and args.report_json.exists():
        report_f1 = json.loads(args.report_json.read_text())["report"]["weighted_f1"]
    print(f"derm/full (tune, {args.budget_minutes:g} min budget) wall {wall / 60:.1f} min, run {flow_run_name}")
    print(f"held-out images: {tuned['n']}  tuned pipeline weighted F1 {tuned['weighted_f1']:.4f} "
          f"accuracy {tuned['accuracy']:.4f} top3 {tuned['top3_accuracy']:.4f}")
    if report_f1:
        print(f"report recipe weighted F1 {report_f1:.4f}  ratio {tuned['weighted_f1'] / report_f1:.2f} (goal >= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
