"""Human-readable summary of a quantization report (the JSON is saved as ``quant_report.json``)."""
from __future__ import annotations

import math


def _fmt(v, spec=".4f"):
    """A figure as text: ``-`` for None; non-finite values (``inf``/``nan`` floats, or the strings the JSON report
    holds for them) as ``inf`` / ``-inf`` / ``nan``; other numbers with ``spec``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return format(v, spec)
    return str(v)


def format_report(rep: dict, max_layers: int = 12) -> str:
    s = rep["settings"]
    m = rep["metrics"]
    lines = [
        "",
        "=" * 78,
        f"quantization report — {rep['model']}",
        f"method {s['method']}  bits {s['bits']}  group {s['group_size']}  sym {s['sym']}  act-order "
        f"{s['act_order']}  format {s['fmt']}  parts {','.join(rep['parts'])}  device {s['device']}  seed {s['seed']}",
    ]
    if s["method"] == "gptq":
        lines.append(f"GPTQ: damp {s['damp']}  group-aware order {s.get('group_order', False)}  sink weight "
                     f"{s.get('sink_weight', 1.0):g}  mse {s.get('mse', False)}  static groups {s['static_groups']}")
    cal = rep.get("calibration", {})
    if "images" in cal:
        c = cal["images"]
        lines.append(f"ViT calibration: {c['images']} images → {c['tiles']} tiles ({c['source']}); held-out "
                     f"{c['heldout_images']} images / {c['heldout_tiles']} tiles")
    if "text" in cal:
        c = cal["text"]
        lines.append(f"LLM calibration: {c['windows']} windows × {c['seqlen']} tokens ({c['source']})"
                     + (f" + {c['image_text_samples']} image+text chat samples" if c.get("image_text_samples") else ""))
    lines.append("-" * 78)
    if "vit_feature_sqnr_db" in m:
        lines.append(f"ViT feature SQNR on held-out images ({m.get('vit_feature')}): {_fmt(m['vit_feature_sqnr_db'], '.2f')} dB")
    if "llm_ppl_float" in m:
        lines.append(f"LLM perplexity on held-out text ({m['llm_ppl_protocol']}): float {_fmt(m['llm_ppl_float'], '.3f')} → "
                     f"quantized {_fmt(m['llm_ppl_quant'], '.3f')}")
    layers = rep.get("layers", [])
    lines.append(f"quantized Linears: {m.get('quantized_linears', 0)}; skipped (kept 16-bit): "
                 f"{len(rep.get('skipped', {}))}; mean output relative error: {_fmt(m.get('mean_output_rel_err'))}")
    if layers:
        worst = sorted(layers, key=lambda r: -(r["output_rel_err"] if r["output_rel_err"] is not None
                                               else r["weight_rel_err"]))[:max_layers]
        lines.append(f"per-layer relative error (worst {len(worst)} of {len(layers)}; all in quant_report.json):")
        lines.append(f"  {'layer':58s} {'out_err':>8s} {'w_err':>8s}")
        for r in worst:
            lines.append(f"  {r['name'][-58:]:58s} {_fmt(r['output_rel_err']):>8s} {_fmt(r['weight_rel_err']):>8s}")
    blocks = rep.get("blocks", [])
    if layers and blocks:
        lines.append(f"time per quantized Linear {sum(r['seconds'] for r in layers) / len(layers):.3f} s, per block "
                     f"{sum(r['seconds'] for r in blocks) / len(blocks):.2f} s (incl. its calibration and held-out "
                     "forwards)")
    mem = ", ".join(f"{k} {v}" for k, v in m.items() if "peak" in k)
    lines.append(f"time: quantize {m.get('seconds_quantize')} s, total {m.get('seconds_total')} s; peak memory: {mem}")
    if rep.get("consumers"):
        t = rep.get("target", {})
        lines.append(f"loads where (python -m quantize check; target {t.get('name')}: "
                     f"{'OK' if t.get('ok') else 'NOT MET'}):")
        for k, v in rep["consumers"].items():
            why = f" — {v['reasons'][0]}" if v["reasons"] and v["verdict"] != "loads" else ""
            lines.append(f"  {k:20s} {v['verdict']}{why}")
    if rep.get("out"):
        lines.append(f"wrote {rep['out']} ({len(rep.get('files', []))} files)")
    lines.append("=" * 78)
    return "\n".join(lines)
