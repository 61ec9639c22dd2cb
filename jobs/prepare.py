"""Ingest, validate, k-core filter and split a dataset; writes Parquet and a manifest.

    python jobs/prepare.py data.dataset=amazon-beauty data.split=loo
"""
import sys

from eimf.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
