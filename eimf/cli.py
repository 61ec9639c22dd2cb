"""`eimf` command line. Every command takes ``--config FILE`` and ``key=value`` overrides of eimf.config.

    eimf train model.backbone=comirec_dr data.dataset=amazon-beauty train.seed=2
    eimf data prepare data.dataset=ml-1m
    eimf data download ml-1m --data-dir ~/datasets
    eimf data list
    eimf evaluate .eimf/runs/<run>/export
    eimf items add models:/eimf-ml-1m@champion --items new_items.csv
    eimf annotate --model-dir .eimf/runs/<run>/export semantic.annotator=vllm semantic.budget=64
    eimf ui

Each command imports the layer it drives when it runs, not at the top: torch, Ray and MLflow take seconds to
import, and ``eimf --help``, ``eimf data list`` or a config error should answer at once.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
from typing import List, Optional

from eimf.config import ConfigError, load_config


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # one line per missing CPU-specific build


def _print_metrics(metrics: dict) -> None:
    keys = sorted(k for k in metrics if k.startswith(("valid/", "best_valid/", "test/")))
    width = max((len(k) for k in keys), default=10)
    for k in keys:
        print(f"  {k:<{width}}  {metrics[k]:.4f}")


def cmd_train(args) -> int:
    from eimf.steps.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    print(f"run {result.run_name}: best model exported to {result.export_dir}")
    _print_metrics(result.metrics)
    for k in ("train_seconds", "examples_per_s", "input_share", "peak_rss_mb", "best_step"):
        if k in result.metrics:
            print(f"  {k:<20}  {result.metrics[k]:.4g}")
    return 0


def cmd_evaluate(args) -> int:
    from eimf.steps.evaluate import evaluate_exported

    metrics = evaluate_exported(args.model_dir, split=args.split, with_baseline=True)
    _print_metrics(metrics)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


def cmd_annotate(args) -> int:
    from eimf.steps import annotate

    cfg = load_config(args.config, args.overrides)
    res = annotate.run(cfg, {"model_dir": args.model_dir} if args.model_dir else {}, args.out,
                       run_name=args.run_name)
    st = res.info["stats"]
    print(f"run {res.info['run_name']}: annotations in {res.info['out_dir']}")
    for k in ("users", "prompts", "cache_hits", "failures", "valid_share", "tokens_in", "tokens_out", "wall_s",
              "tokens_per_s", "prompts_per_s"):
        v = st.get(k)
        print(f"  {k:<14} {v:.4g}" if isinstance(v, float) else f"  {k:<14} {v}")
    return 0


def cmd_data(args) -> int:
    if args.data_cmd == "list":
        from eimf.data.datasets import DATASETS

        for name, spec in DATASETS.items():
            print(f"{name:<16} {getattr(spec, 'description', '')}")
        return 0
    if args.data_cmd == "download":
        from eimf.data.download import download
        from eimf.data.inputs import data_dir as resolve_data_dir

        data_dir = resolve_data_dir(args)  # --data-dir, else $EIMF_DATA_DIR, else ~/.cache/eimf/datasets
        path = download(args.name, data_dir, force=args.force)
        print(f"{args.name} is in {path}; use data.data_dir={data_dir} or EIMF_DATA_DIR={data_dir}")
        return 0
    if args.data_cmd == "verify":
        from eimf.data.download import verify
        from eimf.data.inputs import data_dir as resolve_data_dir

        res = verify(args.name, resolve_data_dir(args))
        print(res.summary())
        return 1 if res.status == "failed" else 0
    if args.data_cmd == "prepare":
        from eimf.data.preprocess import prepare

        cfg = load_config(args.config, args.overrides)
        prepared = prepare(cfg.data)
        print(f"prepared {cfg.data.dataset} in {prepared.path}")
        print(json.dumps(prepared.manifest.get("counts", prepared.manifest), indent=2, default=str))
        return 0
    if args.data_cmd == "synth":
        from eimf.data.synthetic import custom_overrides, describe, synthesize

        try:
            summary = synthesize(args.out, users=args.users, items=args.items, interactions=args.interactions,
                                 seed=args.seed, clusters=args.clusters, interests=args.interests)
        except ValueError as e:
            raise UserError(str(e)) from None
        print(json.dumps(describe(summary)))
        print("read it with: " + " ".join(custom_overrides(os.path.abspath(args.out))))
        return 0
    raise SystemExit(f"unknown data command {args.data_cmd}")


def cmd_recommend(args) -> int:
    from eimf.serving.pyfunc import load_recommender

    rec = load_recommender(args.model)
    request = {"history": args.history, "k": args.k, "exclude_seen": not args.include_seen}
    answer = rec.recommend([request])[0]
    if args.json:
        print(json.dumps(answer, indent=1))
        return 0
    labels = answer["interest_labels"]
    print(f"history: {answer['history_used']} known item(s) used, {answer['unknown_ids']} unknown id(s) ignored")
    if labels:
        print("interests: " + "; ".join(f"{i}: {name}" for i, name in enumerate(labels)))
    width = max([len(i) for i in answer["items"]] + [4])
    named = [f"{k}" + (f" ({labels[k]})" if labels else "") for k in answer["interests"]]
    iw = max([len(n) for n in named] + [8])
    print(f"{'rank':>4}  {'item':<{width}}  {'score':>8}  {'interest':<{iw}}  title")
    for rank, (item, score, interest, title) in enumerate(zip(answer["items"], answer["scores"], named,
                                                            answer["titles"]), 1):
        print(f"{rank:>4}  {item:<{width}}  {score:>8.4f}  {interest:<{iw}}  {title[:80]}")
    return 0


def cmd_serve(args) -> int:
    from eimf.serving.ray_serve import PortInUseError, openapi_document, serve_until_stopped

    if args.openapi:
        print(json.dumps(openapi_document(), indent=1))
        return 0
    if not args.model:
        raise UserError("eimf serve needs a model (a model folder or an MLflow model URI), or --openapi")
    limits = {k: v for k, v in (("max_in_flight", args.max_in_flight), ("max_ongoing_requests", args.max_ongoing),
                                ("max_queued_requests", args.max_queued)) if v is not None}
    try:
        serve_until_stopped(args.model, host=args.host, port=args.port, num_replicas=args.replicas,
                            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                            **limits)
    except PortInUseError as e:
        raise UserError(str(e)) from e
    return 0


def cmd_items(args) -> int:
    from eimf.serving.new_items import add_items

    added = add_items(args.model, args.items, out=args.out, id_column=args.id_column, text_column=args.text_column,
                      tracking_uri=args.tracking_uri, slots=args.slots)
    print(f"added {added.added} item(s) as ids {added.first_item}..{added.n_items} from their text "
          f"(retrieval index: {added.index})")
    if added.model_uri:
        print(f"new model version: {added.model_uri}")
        if args.out:
            print(f"model folder: {added.folder}")
    else:
        print(f"new model folder: {added.folder}")
    return 0


def cmd_ui(args) -> int:
    from eimf.tracking import default_tracking_uri

    uri = args.backend_store_uri or default_tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port),
           "--backend-store-uri", uri]
    print("starting:", " ".join(cmd))
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eimf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp):
        sp.add_argument("--config", help="YAML file overlaid on the defaults")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.backbone=comirec_dr")

    t = sub.add_parser("train", help="prepare data, train a backbone with Ray Train, evaluate, export")
    with_config(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate an exported model (no Ray, no LLM)")
    e.add_argument("model_dir")
    e.add_argument("--split", default="test", choices=["valid", "test"])
    e.add_argument("--output", help="write the metrics as JSON here")
    e.set_defaults(fn=cmd_evaluate)

    r = sub.add_parser("recommend", help="top-k items for a history of raw item ids, from a model folder or an "
                       "MLflow model URI (models:/eimf-ml-1m/1)")
    r.add_argument("model", help="model folder (local or s3://) or MLflow model URI")
    r.add_argument("--history", nargs="+", required=True, help="the user's recent raw item ids, oldest first")
    r.add_argument("-k", "--k", type=int, default=10)
    r.add_argument("--include-seen", action="store_true", help="keep the history's items in the answer")
    r.add_argument("--json", action="store_true", help="print the answer as JSON")
    r.set_defaults(fn=cmd_recommend)

    sv = sub.add_parser("serve", help="serve a model over HTTP with Ray Serve (POST /recommend, /openapi.json) "
                        "until Ctrl-C; starts Ray here unless RAY_ADDRESS names a cluster")
    sv.add_argument("model", nargs="?", help="model folder (local or s3://) or MLflow model URI")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--max-batch-size", type=int, default=64)
    sv.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long a batch waits to fill")
    sv.add_argument("--max-in-flight", type=int, help="requests a replica holds; past them, 503 at once (default 64)")
    sv.add_argument("--max-ongoing", type=int, help="Ray Serve's max_ongoing_requests per replica (default 256)")
    sv.add_argument("--max-queued", type=int, help="Ray Serve's max_queued_requests (default 64)")
    sv.add_argument("--openapi", action="store_true", help="print the API's OpenAPI document and exit")
    sv.set_defaults(fn=cmd_serve)

    a = sub.add_parser("annotate", help="ESIM: pick typical users, annotate their interests (semantic.annotator: "
                       "metadata | openai | vllm), encode, write Parquet, log to MLflow")
    with_config(a)
    a.add_argument("--model-dir", help="exported warm-up model (eimf train's <run>/export) for typical-user "
                   "selection; without it the budget is drawn at random")
    a.add_argument("--out", help="output folder, local or s3:// (default: <EIMF_HOME>/annotations/<run name>)")
    a.add_argument("--run-name", help="MLflow run name (default: annotate-<dataset>-<annotator>-<time>)")
    a.set_defaults(fn=cmd_annotate)

    d = sub.add_parser("data", help="datasets: list, download, prepare")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dsub.add_parser("list", help="built-in datasets")
    dl = dsub.add_parser("download", help="download a public dataset from its publisher (checksummed)")
    dl.add_argument("name")
    dl.add_argument("--data-dir", help="destination folder (default: $EIMF_DATA_DIR or ~/.cache/eimf/datasets)")
    dl.add_argument("--force", action="store_true")
    ve = dsub.add_parser("verify", help="check a dataset folder against its SHA256SUMS / CHECKSUMS files")
    ve.add_argument("name", nargs="?", help="dataset folder name (default: every listed file of the data dir)")
    ve.add_argument("--data-dir", help="default: $EIMF_DATA_DIR or ~/.cache/eimf/datasets")
    sy = dsub.add_parser("synth", help="a synthetic catalogue with planted topics and Zipf popularity, in the "
                         "layout data.dataset=custom reads")
    sy.add_argument("--users", type=int, required=True)
    sy.add_argument("--items", type=int, required=True)
    sy.add_argument("--interactions", type=int, required=True)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--clusters", type=int, default=0, help="topics (default: items / 200, 2 to 5000)")
    sy.add_argument("--interests", type=int, default=3, help="latent topics per user")
    sy.add_argument("--out", required=True, help="output folder")
    pr = dsub.add_parser("prepare", help="ingest, validate, k-core, split; writes Parquet and a manifest")
    with_config(pr)
    d.set_defaults(fn=cmd_data)

    it = sub.add_parser("items", help="items of a trained model: add new ones from their text, no retraining")
    isub = it.add_subparsers(dest="items_cmd", required=True)
    ia = isub.add_parser("add", help="give new items rows from their text (the model's text map) and a place in its "
                         "index; writes a new model folder, or registers a new version of an MLflow model")
    ia.add_argument("model", help="model folder (local or s3://) or MLflow model URI (models:/eimf-ml-1m/3, "
                    "models:/eimf-ml-1m@champion)")
    ia.add_argument("--items", required=True, help="CSV file of the new items: a raw id and a text per row")
    ia.add_argument("--id-column", default="item_id", help="the CSV's raw id column (default item_id)")
    ia.add_argument("--text-column", default="text", help="the CSV's text column (default text)")
    ia.add_argument("--out", help="write the new model folder here (local or s3://; default: a temporary folder)")
    ia.add_argument("--slots", type=int, default=None,
                    help="places of each answer reserved for the best new items, until a retraining learns them "
                         "(default: as the model's last addition set, else 0: new items compete on their scores)")
    ia.add_argument("--tracking-uri", help="MLflow store of a models:/ URI (default: $MLFLOW_TRACKING_URI, else "
                    "eimf's own)")
    ia.set_defaults(fn=cmd_items)

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against the project's store")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--backend-store-uri")
    u.set_defaults(fn=cmd_ui)
    return p


class UserError(Exception):
    """Errors whose message tells the user what to do; printed without a traceback."""


def user_errors() -> tuple:
    from eimf.data.download import DownloadError

    from eimf.serving.folder import ModelFolderError
    from eimf.serving.new_items import NewItemsError
    from eimf.serving.schema import RequestError

    # ModelNotFoundError is a FileNotFoundError; ConfigError names the setting and what it accepts
    errors = [UserError, ConfigError, DownloadError, FileNotFoundError, ModelFolderError, RequestError,
              NewItemsError]
    try:
        from mlflow.exceptions import MlflowException  # e.g. a models:/ URI that is not registered

        errors.append(MlflowException)
    except ImportError:  # pragma: no cover
        pass
    try:
        from eimf.data.parsers import DataError

        errors.append(DataError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def exits_2_on_user_error(prog: str):
    """Decorator for a command's ``main``: a user's mistake (:func:`user_errors`: a setting, the data, a missing
    file) prints one line ``<prog>: error: <message>`` and returns 2, without a traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except user_errors() as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap


@exits_2_on_user_error("eimf")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
