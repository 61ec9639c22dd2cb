"""The whole EIMF pipeline in one job: prepare -> IBIM warm-up -> typical users + annotation -> EIMF training ->
evaluation -> export, one config for every stage (eimf/pipeline/__init__.py says what each stage does and writes).

    python jobs/pipeline.py                                        # laptop: local Ray, SQLite MLflow under .eimf/
    python jobs/pipeline.py --config cluster/laptop.yaml pipeline.run_name=my-run data.dataset=ml-100k
    python jobs/pipeline.py --plan pipeline.run_name=my-run         # what would run or be skipped, and why
    python jobs/pipeline.py pipeline.from_model=models:/eimf-ml-1m@champion data.since=1700000000 data.replay=0.1
                                                                    # retrain from the served model on a new window
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \\
        -- python jobs/pipeline.py --config cluster/gpu.yaml pipeline.run_name=ml1m-qwen

Arguments: the options of ``PipelineArguments`` below, then ``key=value`` overrides of eimf.config.Config
(``pipeline.run_name``, ``pipeline.storage_path``, ``pipeline.warmup_steps``, ``semantic.annotator``, ...).
The same ``pipeline.run_name`` again skips the stages that are done and resumes an interrupted one.
"""
import argparse
import logging
import sys
from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass
class PipelineArguments:
    config: Optional[str] = field(default=None, metadata={
        "help": "YAML file overlaid on eimf's typed defaults (eimf/config/); key=value overrides go after it"})
    plan: bool = field(default=False, metadata={
        "help": "print every stage's fingerprint and whether it would run or be skipped, then exit"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})


def parse_args(argv=None):
    """``(PipelineArguments, overrides)``. The parser is built from the dataclass fields, as HF example scripts do
    with ``HfArgumentParser``; that parser gives bool options an optional value, which would swallow a following
    ``key=value`` override (``--plan pipeline.run_name=x``), so booleans here are plain flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(PipelineArguments):
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of eimf.config.Config")
    ns = parser.parse_args(argv)
    bad = [a for a in ns.overrides if "=" not in a]
    if bad:
        parser.error(f"not a key=value override: {' '.join(bad)}")
    return PipelineArguments(**{f.name: getattr(ns, f.name) for f in fields(PipelineArguments)}), ns.overrides


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # the config first, alone: a wrong setting answers in one line before torch, Ray and MLflow load
    from eimf.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    from eimf.cli import user_errors
    from eimf.pipeline import Pipeline, PipelineError

    try:
        pipeline = Pipeline(cfg)
        if args.plan:
            for p in pipeline.plan():
                print(f"{p.name:<9} {'skip' if p.skip else 'run ':<4} {p.fingerprint[:12]}  {p.reason}  ({p.dir})")
                if "from_model" in p.config:  # the warm start's source, an alias pinned to its version
                    print(f"{'':<9} warm start from {p.config['from_model']['uri']}")
            return 0
        results = pipeline.run()
    except (PipelineError, *user_errors()) as e:  # load_config's errors too: one line naming the setting
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    final = next((r for r in results if r.stage == "export"), None)
    if final is not None:
        print(f"final model: {final.outputs.get('model_dir')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
