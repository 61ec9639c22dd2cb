"""Run by tests/test_semantic_cache.py in its own process, to be SIGKILLed midway: annotates the tiny dataset of
that test module through the real cache, streaming slowly, and appends each prompt's hash to ``<log>`` as it
is answered (before the cache has it), so the test knows what was in flight when the process died."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_semantic_cache import Counting, HashEncoder, prepared  # noqa: E402

from eimf.semantic.annotate import annotate_users  # noqa: E402
from eimf.semantic.cache import AnnotationCache  # noqa: E402


class Slow(Counting):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def generate_stream(self, requests, attempt):
        for j, g in enumerate(self.generate(requests, attempt)):
            time.sleep(0.3)
            with open(self.log, "a") as f:
                f.write(requests[j].history_hash + "\n")
            yield [(j, g)]


if __name__ == "__main__":
    cache_dir, log = sys.argv[1], sys.argv[2]
    ann = Slow(log)
    annotate_users(prepared(), list(range(1, 24)), ann, AnnotationCache(cache_dir, ann.model_id), HashEncoder(),
                   K=3, token_budget=2048, chunk_size=5)
