"""The quality measurement of the tuning issue, through the real deployment.

Holds out the same rows of atlas20 as `bench_quality.py` (its grouped split: no near-duplicate
group shared with training), serves the rest from a local HTTP server, runs

    prefect deployment run derm/full -p csv=<the train and val rows> -p image_size=128 -p weights=none \\
        -p tune=true -p seed=<seed> -p budget_minutes=15 -p architectures='["baseline_cnn"]' --watch

once per seed (0, 1, 2 by default) on the stack of `make up` (with
DERMFLOW_ALLOWED_HOSTS=127.0.0.1), then scores each run with
`dermflow evaluate --model <run> --csv <held-out rows> --images <atlas20 images> --json` and
prints the mean ± spread of its weighted F1 over the seeds beside the report recipe's (from
`bench_quality.py`, given with --report-f1 or read from its JSON output).

    .venv/bin/python bench/bench_quality_deployment.py [--seeds 0,1,2] [--budget-minutes 15] [--report-json FILE]
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


def run_pipeline(csv_path: Path, seed: int, budget_minutes: float, env: dict) -> tuple[str | None, float]:
    """`prefect deployment run derm/full ... --watch` as a user types it; the flow run's name and wall time."""
    bin_dir = Path(sys.executable).parent
    started = time.monotonic()
    run = subprocess.run(
        [str(bin_dir / "prefect"), "deployment", "run", "derm/full", "-p", f"csv={csv_path}",
         "-p", "image_size=128", "-p", "weights=none", "-p", "tune=true", "-p", f"seed={seed}",
         "-p", f"budget_minutes={budget_minutes}", "-p", 'architectures=["baseline_cnn"]', "--watch"],
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT,
    )
    wall = time.monotonic() - started
    if run.returncode != 0:
        raise RuntimeError(f"derm/full (seed {seed}) failed:\n{run.stdout[-5000:]}\n{run.stderr[-3000:]}")
    name = re.search(r"Created flow run '([^']+)'", run.stdout)
    return (name.group(1) if name else None), wall


def evaluate_run(flow_run_name: str | None, held_out_csv: Path, env: dict) -> dict:
    """`dermflow evaluate --model <run>` on the held-out rows, as a user scores a finished run."""
    bin_dir = Path(sys.executable).parent
    evaluate = subprocess.run(
        [str(bin_dir / "dermflow"), "evaluate", "--csv", str(held_out_csv),
         "--images", str(ATLAS_DIR / "images"), "--json"] + (["--model", flow_run_name] if flow_run_name else []),
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, check=True,
    )
    return json.loads(evaluate.stdout)


def report_recipe_f1(args) -> float | None:
    """The report recipe's mean held-out weighted F1, measured once per seed by bench_quality.py."""
    if args.report_f1 is not None:
        return args.report_f1
    if args.report_json and args.report_json.exists():
        report = json.loads(args.report_json.read_text()).get("report", {})
        return report.get("mean", report.get("weighted_f1"))
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-minutes", type=float, default=15)
    parser.add_argument("--seeds", default="0,1,2", help="derm/full's seed, one run each, comma-separated")
    parser.add_argument("--report-json", type=Path, help="output of bench_quality.py --out (its report recipe)")
    parser.add_argument("--report-f1", type=float, help="the report recipe's held-out weighted F1")
    parser.add_argument("--out", type=Path, default=None, help="write the per-seed results here as JSON")
    args = parser.parse_args()
    if not (ATLAS_DIR / "rows.csv").exists():
        print(f"{ATLAS_DIR} is absent: this bench needs ../shared/data/atlas20", file=sys.stderr)
        return 2

    import pandas as pd

    from bench.bench_quality import fixed_split, summary_of
    from tests.support.image_servers import rewrite_csv_host, serve_atlas

    work = Path(tempfile.mkdtemp(prefix="dermflow-quality-"))
    rows = pd.read_csv(ATLAS_DIR / "rows.csv", dtype=str, keep_default_na=False)
    # The in-process bench's grouped split: held out = its test rows; the pipeline gets only its
    # train and val rows (not the excluded near-duplicates of held-out diagnostic rows).
    split = fixed_split(rows, ATLAS_DIR).set_index("md5hash")["split"]
    where = rows["md5hash"].map(split)
    rows[where.isin(["train", "val"])].to_csv(work / "train_rows.csv", index=False)
    rows[where == "test"].to_csv(work / "held_out.csv", index=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results: dict = {"budget_minutes": args.budget_minutes, "seeds": seeds, "runs": []}
    with serve_atlas(ATLAS_DIR / "images", ATLAS_DIR / "rows.csv") as server:
        csv_path = rewrite_csv_host(work / "train_rows.csv", server.base_url, work / "train_served.csv")
        for seed in seeds:
            flow_run_name, wall = run_pipeline(csv_path, seed, args.budget_minutes, env)
            scored = evaluate_run(flow_run_name, work / "held_out.csv", env)
            results["runs"].append({"seed": seed, "run": flow_run_name, "wall_s": round(wall, 1), **scored})
            print(f"seed {seed}: derm/full wall {wall / 60:.1f} min, run {flow_run_name}; held-out images "
                  f"{scored['n']}, weighted F1 {scored['weighted_f1']:.4f} accuracy {scored['accuracy']:.4f} "
                  f"top3 {scored['top3_accuracy']:.4f}", flush=True)
            if args.out:  # after every seed, so a cut-off run keeps what finished
                args.out.write_text(json.dumps(results, indent=2, default=str))
    scores = [run["weighted_f1"] for run in results["runs"]]
    results["tuned"] = summary_of(scores)
    print(f"derm/full + dermflow evaluate: held-out weighted F1 {results['tuned']['mean']:.4f} "
          f"± {results['tuned']['std']:.4f} (seeds {seeds}: {', '.join(f'{x:.4f}' for x in scores)})")
    report_f1 = report_recipe_f1(args)
    if report_f1:
        results["report_mean"] = report_f1
        print(f"report recipe weighted F1 {report_f1:.4f} (bench_quality.py, same held-out rows); "
              f"ratio {results['tuned']['mean'] / report_f1:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
