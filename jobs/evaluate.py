"""Evaluate an exported model on valid or test users, without Ray and without any LLM.

    python jobs/evaluate.py .eimf/runs/<run>/export --split test
"""
import sys

from eimf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
