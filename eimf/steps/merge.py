"""Step ``merge``: one annotation set from two, for a grid's ``coverage`` variant.

``inputs["base"]`` (e.g. the metadata annotator on every training user) with the users that ``inputs["overlay"]``
answered (e.g. the LLM on the typical users) taking its interests (:func:`eimf.formats.annotations.merge_annotations`).
No MLflow run of its own: it only rearranges two sets that have theirs.
"""
from __future__ import annotations

from typing import Optional

from eimf import fs
from eimf.formats.annotations import ANNOTATIONS_FILE, STATS_FILE, merge_annotations
from eimf.steps import StepOutput, numbers


def run(cfg, inputs: dict, out_dir: str, tags: Optional[dict] = None, run_name: str = "") -> StepOutput:
    stats = merge_annotations(inputs["base"], inputs["overlay"], out_dir)
    return StepOutput({"annotations": fs.join(out_dir, ANNOTATIONS_FILE), "stats": fs.join(out_dir, STATS_FILE)},
                      numbers(stats))
