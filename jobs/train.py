"""Train one backbone (Ray Train), evaluate on valid/test users, export the best model.

    python jobs/train.py model.backbone=comirec_dr data.dataset=amazon-beauty train.seed=2
    python jobs/train.py pipeline.from_model=models:/eimf-amazon-beauty@champion   # warm start from a model
    ray job submit --working-dir . -- python jobs/train.py --config my.yaml

Arguments are the typed fields of eimf.config.Config (``--config FILE`` and ``key=value``).
"""
import sys

from eimf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
