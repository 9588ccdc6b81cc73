"""`dermflow` command line: the stack (up, down, status; in `dermflow.ops.lifecycle`),
prediction, evaluation, reports, the offline mirror and the image import.

Exit codes: 0 success, 1 a command failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dermflow.config import RUN_DEFAULTS
from dermflow.errors import DermflowError
from dermflow.ops import k8s
from dermflow.ops.lifecycle import CommandError, cmd_down, cmd_status, cmd_up
from dermflow.settings import get_settings

NOT_FOR_CLINICAL_USE = (
    "Research tool only: not a medical device and not for clinical use or diagnosis."
)
# --- models ----------------------------------------------------------------------------------
# On by default, as in the pipeline's own test evaluation (TrainConfig.tta): +0.014 held-out
# weighted F1 on atlas20 (bench/README.md).
TTA_HELP = "average with the horizontally flipped images (default; --no-tta: the images alone)"


def _model_bundle(args):
    """The model `--model`/`--arch` name (default: the champion), cached locally once."""
    from dermflow.evaluation.predict import load_model_bundle
    from dermflow.runs import check_run_reference
    from dermflow.storage import ObjectStore

    run = check_run_reference(args.model) if args.model is not None else None
    settings = get_settings()
    return load_model_bundle(ObjectStore.from_settings(settings), run, args.arch,
                             settings.local_cache_dir / "models")


def cmd_predict(args) -> int:
    """Exit 1 when any source could not be predicted (each one's error is printed; the others
    are still predicted)."""
    from dermflow.evaluation.predict import predict_images

    bundle = _model_bundle(args)
    results = predict_images(bundle, args.sources, top_k=args.top_k, tta=args.tta)
    if args.explain:
        from dermflow.evaluation.predict import explain_image

        explain_image(bundle, args.sources[0], Path(args.explain))
    failed = [result for result in results if result["error"]]
    if args.json:
        print(json.dumps({"model": bundle.describe(), "predictions": results,
                          "note": NOT_FOR_CLINICAL_USE}, indent=2))
    else:
        print(f"model: {bundle.describe()}")
        for result in results:
            print(result["source"])
            if result["error"]:
                print(f"  error: {result['error']}")
            for rank, item in enumerate(result["top"], start=1):
                print(f"  {rank}. {item['label']:<45} {item['probability']:.3f}")
        if args.explain:
            print(f"saliency map written to {args.explain}")
        print(NOT_FOR_CLINICAL_USE)
    if failed:
        print(f"dermflow predict: {len(failed)} of {len(results)} source(s) failed", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from dermflow.evaluation.predict import evaluate_dataset

    bundle = _model_bundle(args)
    with tqdm(desc="evaluating", unit="img", disable=args.json or not sys.stderr.isatty()) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = evaluate_dataset(bundle, Path(args.csv), Path(args.images), progress=progress, tta=args.tta)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
        return 0
    print(f"model: {bundle.describe()}")
    print(f"images scored {result['n']}  " + "  ".join(f"{k}={v}" for k, v in result.get("skipped", {}).items()))
    for md5hash, why in result.get("unreadable_errors", {}).items():
        print(f"  unreadable {md5hash}: {why}")
    for key in ("accuracy", "weighted_f1", "macro_f1", "top3_accuracy", "top5_accuracy"):
        if key in result:
            print(f"{key:15} {result[key]:.4f}")
    for name, values in result.get("per_range", {}).items():
        print(f"  range {name:8} n={values['n']:<5} accuracy={values['accuracy']:.4f} weighted_f1={values['weighted_f1']:.4f}")
    print(NOT_FOR_CLINICAL_USE)
    return 0


def _print_run_metrics(metrics: dict) -> None:
    """One line per architecture of a run's metrics.json: its test scores, or why it failed."""
    for arch, entry in metrics.get("architectures", {}).items():
        test = entry.get("test") or {}
        if entry.get("status") == "ok":
            print(f"  {arch:20} accuracy={test.get('accuracy', float('nan')):.4f} "
                  f"weighted_f1={test.get('weighted_f1', float('nan')):.4f}")
        else:
            print(f"  {arch:20} FAILED: {entry.get('error')}")


def cmd_report(args) -> int:
    from dermflow.layout import report_key, run_metrics_key
    from dermflow.registry.runs import list_runs, resolve_run_id
    from dermflow.runs import check_run_reference
    from dermflow.storage import ObjectMissing, ObjectStore

    run = check_run_reference(args.run_id)  # before it reaches the store: `../x` is no run
    store = ObjectStore.from_settings(get_settings())
    run_id = resolve_run_id(store, run)
    key = report_key(run_id)
    try:
        if args.output:
            store.download_file(key, Path(args.output))
            print(f"report written to {args.output}")
        metrics = store.get_json(run_metrics_key(run_id))
    except ObjectMissing as error:
        runs = [run for run in list_runs(store) if store.exists(report_key(run))]
        raise CommandError(f"{error}; runs with a report: {', '.join(runs[-10:]) or 'none'}") from error
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"report: {store.uri(key)}")
    url = store.presign(key)
    if url:
        print(f"open:   {url}")
    _print_run_metrics(metrics)
    return 0


def cmd_mirror(args) -> int:
    from dermflow.ops.mirror import run_mirror

    run_mirror(args.atlas_dir, args.port, args.csv_out, limit_per_label=args.limit_per_label)
    return 0


def cmd_import(args) -> int:
    """Import the CSV's images from an archive, folder or S3 prefix into the bucket, then write
    the fetch manifest (rows the source lacks stay `not_fetched` until a derm run fetches them)."""
    from dermflow import layout
    from dermflow.ingestion import importer, ingest
    from dermflow.ingestion.manifest import summarize_manifest, write_latest_fetch
    from dermflow.runs import make_run_id
    from dermflow.storage import ObjectStore

    store = ObjectStore.from_settings(get_settings(), max_pool_connections=64)
    store.ensure_bucket()
    dataset = ingest.load_dataset(args.csv, store=store)
    dataset_key = layout.dataset_key(ingest.dataset_fingerprint(dataset))
    store.put_dataframe_csv(dataset_key, dataset)

    def progress(done: int, total: int) -> None:
        print(f"\rimported {done} / {total}", end="", file=sys.stderr, flush=True)

    results, plan = importer.import_dataset(store, dataset, args.images, shard_size=args.shard_size,
                                            progress=progress)
    print(file=sys.stderr)
    history_key, manifest = write_latest_fetch(store, dataset, dataset_key, results, make_run_id("import"))
    summary = {**summarize_manifest(manifest), "import": plan, "manifest": store.uri(history_key)}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_stage(args) -> int:
    """Upload a local file or folder to the bucket; print the s3:// URI to pass as a parameter."""
    from dermflow.inputs import stage
    from dermflow.storage import ObjectStore

    store = ObjectStore.from_settings(get_settings())
    store.ensure_bucket()
    print(stage(store, args.path))
    return 0


def _add_stack_commands(sub) -> None:
    """up, down, status."""
    up = sub.add_parser("up", help="start SeaweedFS, the Prefect server, workers; register deployments")
    up.add_argument("--no-deploy", action="store_true", help="do not (re)register the deployments")
    up.add_argument("--no-supervisor", action="store_true",
                    help="do not start the supervisor loop that restarts crashed services")
    up.add_argument("--systemd-units", metavar="DIR",
                    help="only write a systemd user unit for the stack to DIR (e.g. ~/.config/systemd/user)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop everything `up` started").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="show the stack's services (exit 1 if one is down)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)


def _add_model_commands(sub) -> None:
    """predict, evaluate, report."""
    model_help = "a run id (20261126-101500-brave-otter) or the flow run's name; default: the champion"
    predict = sub.add_parser("predict", help="top-5 conditions for images (paths or URLs)")
    predict.add_argument("sources", nargs="+", metavar="IMAGE_OR_URL")
    predict.add_argument("--model", help=model_help)
    predict.add_argument("--arch", help="architecture of that run (default: the run's best)")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--explain", metavar="OUT.png", help="write the first image with its Grad-CAM heatmap")
    predict.add_argument("--json", action="store_true")
    predict.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help=TTA_HELP)
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a model on a labelled set you bring")
    evaluate.add_argument("--csv", required=True, help="rows in the Fitzpatrick 17k schema")
    evaluate.add_argument("--images", required=True, help="directory of <md5hash>.<ext> images")
    evaluate.add_argument("--model", help=model_help)
    evaluate.add_argument("--arch", help="architecture of that run (default: the run's best)")
    evaluate.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help=TTA_HELP)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    report = sub.add_parser("report", help="where a run's report is, and its headline metrics")
    report.add_argument("run_id", help="a run id (20261126-101500-brave-otter) or the flow run's name (brave-otter)")
    report.add_argument("--output", "-o", help="download report.html here")
    report.add_argument("--json", action="store_true", help="print metrics.json")
    report.set_defaults(func=cmd_report)


def _add_data_commands(sub) -> None:
    """import, stage, mirror."""
    importer = sub.add_parser("import", help="import the dataset's images from an archive, folder or S3 prefix")
    importer.add_argument("--csv", required=True, help="the dataset CSV (path, https URL or s3:// URI)")
    importer.add_argument("--images", required=True,
                          help="a .zip/.tar/.tar.gz/.tgz (path, s3:// or https:// URI), a folder, or s3://bucket/prefix/")
    importer.add_argument("--shard-size", type=int, default=RUN_DEFAULTS["shard_size"], help="members read per batch")
    importer.set_defaults(func=cmd_import)

    stage = sub.add_parser("stage", help="upload a local csv, images archive/folder or weights file; print its s3:// URI")
    stage.add_argument("path", type=Path)
    stage.set_defaults(func=cmd_stage)

    mirror = sub.add_parser("mirror", help="serve a folder of dataset images locally, for runs without internet")
    mirror.add_argument("atlas_dir", type=Path, help="a folder with images/<md5hash>.jpg and rows.csv")
    mirror.add_argument("--port", type=int, default=8765)
    mirror.add_argument("--csv-out", type=Path, help="write a copy of rows.csv whose URLs point at the mirror")
    mirror.add_argument("--limit-per-label", type=int, help="only this many rows per label in --csv-out")
    mirror.set_defaults(func=cmd_mirror)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stack_commands(sub)
    _add_model_commands(sub)
    _add_data_commands(sub)
    k8s.add_parser(sub)

    from dermflow.ops import runlist, schedule

    runlist.add_parser(sub)
    schedule.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dermflow.ops.gpu_env import hide_gpus

    hide_gpus()  # predict/evaluate run on the CPU: the GPUs belong to the trainers
    try:
        return args.func(args)
    # dermflow's own errors, and a file the user named that is not there: one clear line, exit 1;
    # anything else is a bug and keeps its traceback
    except (DermflowError, FileNotFoundError) as error:
        print(f"dermflow {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
