"""Block-by-block, true-sequential quantization of a whole model (InternViT and/or the LLM).

For every block, in order:

1. the block is moved to ``device`` (everything else stays in CPU memory);
2. the held-out *float* stream is pushed through the still-float block (for the before/after metrics);
3. the block is quantized from the calibration stream — which holds the outputs of the already-quantized previous
   blocks — with
   * **GPTQ**: one pass per true-sequential group (``[qkv] → [proj] → [fc1] → [fc2]`` for InternViT,
     ``[q,k,v] → [o] → [gate,up] → [down]`` for Llama), accumulating each Linear's Hessian with the earlier groups
     of the block already quantized (the pass stops as soon as the group's inputs are captured);
   * **AWQ**: one capture pass, the scale search per group on the float block, folding, clipping search, RTN;
   * **RTN**: no calibration;
   and every quantized Linear's weight is replaced by its dequantized value (fake-quant);
4. the calibration stream and the held-out *quantized* stream are pushed through the quantized block;
5. the block goes back to the CPU.

Nothing but one block and the activation streams is ever on the device, so InternViT-6B and a 34B LLM quantize on
one GPU. The final LLM norm + lm_head are moved to the device only to compute the held-out perplexities.
"""
from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from internvl_kernels.quant import formats

from ._interrupt import check as check_interrupt
from .awq import awq_finalize, search_clip, search_scale
from .blocks import adapter_for, fold_scale
from .gptq import Hessian, gptq_quantize, shared_act_order
from .result import QuantResult
from .metrics import sqnr_db
from .rtn import rtn_quantize
from .streams import Stream, StopForward

__all__ = ["QuantSettings", "PipelineResult", "quantize_stack"]


@dataclass
class QuantSettings:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.1  # GPTQ damping (fraction of mean diag H); chosen on the dev windows, see quantize/README.md
    fmt: str = "gptq"
    skip: tuple = ()
    device: str = "cpu"
    seed: int = 0
    blocksize: int = 128
    awq_search_tokens: int = 16384
    mse: bool = False  # GPTQ: MSE grid search of each group's range (AutoGPTQ's mse option)
    group_order: bool = True  # GPTQ without act-order: group-aware reordering (GAR), natural g_idx
    skip_first_tokens: int = 0
    sink_weight: float = 1.0  # GPTQ: weight of each sequence's first token in the k/v projections' Hessians  # leave the first token(s) of every sequence out of the GPTQ Hessians
    progress: bool = True
    # Linears (block-relative names) stored as ONE packed tensor (InternLM2's wqkv): with act-order they share one
    # column order, hence one g_idx (set by the runner for InternLM2 LLMs)
    packed_linears: tuple = ()

    @property
    def min_zero(self) -> int:
        # GPTQ v1 stores zero-1: keep every zero point >= its zero offset (symmetric zeros are 2**(bits-1) anyway)
        return 0 if self.sym else formats.get_format(self.fmt).zero_offset


@dataclass
class PipelineResult:
    results: dict = field(default_factory=dict)  # full module name -> QuantResult
    layers: list = field(default_factory=list)  # per-Linear report rows
    skipped: dict = field(default_factory=dict)  # full module name -> reason
    metrics: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)  # per-block report rows


# ---------------------------------------------------------------------------------------------------- helpers
def _first_tensor(args, kwargs):
    if args:
        return args[0], None
    for k in ("hidden_states", "x", "input"):
        if k in kwargs:
            return kwargs[k], k
    raise RuntimeError("cannot find the input tensor of an inspected module")


def _call_inspect(module, x, rec):
    args, kwargs, key = rec
    out = module(**{**kwargs, key: x}) if key else module(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _should_skip(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _storable(lin: nn.Linear, st: QuantSettings) -> str | None:
    ok, why = formats.get_format(st.fmt).can_store(lin.in_features, lin.out_features, st.bits, st.group_size)
    return None if ok else why


def _set_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight.copy_(w.to(lin.weight.dtype))


# ---------------------------------------------------------------------------------------------------- per block
def _quantize_block(ad, prefix: str, calib: Stream, st: QuantSettings, res: PipelineResult) -> None:
    linears = ad.linears()
    todo = {}
    for name, lin in linears.items():
        full = f"{prefix}.{name}"
        if _should_skip(full, st.skip):
            res.skipped[full] = "matched --skip"
            continue
        why = _storable(lin, st)
        if why:
            res.skipped[full] = f"not storable as {st.fmt}: {why}"
            continue
        todo[name] = lin
    if not todo:
        return None
    if st.method == "rtn":
        for name, lin in todo.items():
            t0 = time.perf_counter()
            r = rtn_quantize(lin.weight.data, st.bits, st.group_size, st.sym, st.min_zero)
            _finish(res, prefix, name, lin, r, None, lin.weight.data, time.perf_counter() - t0)
        return None
    with torch.no_grad():
        if st.method == "gptq":
            if hasattr(ad, "forward_sequential"):
                return _gptq_block_staged(ad, prefix, calib, st, res, todo)
            _gptq_block(ad, prefix, calib, st, res, todo)
        elif st.method == "awq":
            _awq_block(ad, prefix, calib, st, res, todo)
        else:
            raise ValueError(f"unknown method {st.method!r}")
    return None


def _finish(res, prefix, name, lin, r: QuantResult, H, w_ref, seconds, extra=None):
    full = f"{prefix}.{name}"
    row = {"name": full, "shape": [lin.out_features, lin.in_features], "method": r.method, "bits": r.bits,
           "group_size": r.group_size, "weight_rel_err": r.relative_error(w_ref),
           "output_rel_err": r.relative_error(w_ref, H) if H is not None else None, "seconds": round(seconds, 3)}
    for k in ("damp", "dead_columns"):
        if k in r.info:
            row[k] = r.info[k]
    if extra:
        row.update(extra)
    res.layers.append(row)
    _set_weight(lin, r.dequantized_stored)
    res.results[full] = r.to("cpu")


def _run(ad, calib: Stream, stop_hooks=None):
    for x, kw in calib:
        try:
            ad.forward(x, kw)
        except StopForward:
            pass


def _hessian_input(ad, st, name, x):
    """The rows GPTQ's Hessian of Linear ``name`` sees (``--skip-first-tokens``, ``--sink-weight``)."""
    if st.skip_first_tokens and x.dim() == 3:
        x = x[:, st.skip_first_tokens:]
    if st.sink_weight != 1.0 and name in getattr(ad, "sink_linears", ()) and x.dim() == 3:
        # the first token of every window is the attention sink: its key/value reach every query,
        # so its rows count sink_weight times in the Hessian of k/v (GPTQ's objective)
        x = x.clone()
        x[:, 0] *= math.sqrt(st.sink_weight)
    return x


def _gptq_block_staged(ad, prefix, calib, st, res, todo) -> Stream:
    """GPTQ of one block in a single staged forward (``ad.forward_sequential``); returns the block's outputs.

    The Linears of one sequential group share their input, so they share one Hessian and one factorization
    (k/v get their own when ``--sink-weight`` weights them differently from q).
    """
    group_of = {n: gi for gi, g in enumerate(ad.sequential) for n in g}
    hs, factors = {}, {}

    def key(name):
        weighted = st.sink_weight != 1.0 and name in getattr(ad, "sink_linears", ())
        return group_of[name], weighted

    def capture(name, x):
        if name not in todo:
            return
        k = key(name)
        if k not in hs:
            hs[k] = [Hessian(todo[name].in_features, device=todo[name].weight.device), name]
        if hs[k][1] == name:  # the first Linear of the key adds each batch once
            hs[k][0].add(_hessian_input(ad, st, name, x))

    def quantize(gi):
        names = [n for n in ad.sequential[gi] if n in todo]
        # Linears stored as one packed tensor (InternLM2's wqkv) share one act-order column order (one g_idx)
        shared = [n for n in names if n in st.packed_linears]
        perm = shared_act_order([hs[key(n)][0].H for n in shared]) if st.act_order and len(shared) > 1 else None
        for n in names:
            lin = todo[n]
            t0 = time.perf_counter()
            w = lin.weight.data
            H = hs[key(n)][0].H
            r = gptq_quantize(w, H, st.bits, st.group_size, st.sym, st.act_order, st.static_groups, st.damp,
                              st.blocksize, st.min_zero, st.mse, perm=perm if n in shared else None,
                              cache=factors.setdefault(key(n), {}), group_order=st.group_order)
            _finish(res, prefix, n, lin, r, H / 2, w.clone(), time.perf_counter() - t0)
        for k in [k for k in hs if k[0] == gi]:
            del hs[k]
            factors.pop(k, None)

    outs = ad.forward_sequential(calib, capture, quantize)
    return Stream((y, kw) for y, (_, kw) in zip(outs, calib))


def _gptq_block(ad, prefix, calib, st, res, todo):
    for group in ad.sequential:
        names = [n for n in group if n in todo]
        if not names:
            continue
        hs = {n: Hessian(todo[n].in_features, device=todo[n].weight.device) for n in names}
        fired: set = set()
        handles = []

        def make_hook(n):
            def hook(mod, args):
                hs[n].add(_hessian_input(ad, st, n, args[0]))
                fired.add(n)
                if len(fired) == len(names):
                    raise StopForward  # all inputs of this group captured: skip the rest of the block
            return hook

        for n in names:
            handles.append(todo[n].register_forward_pre_hook(make_hook(n)))
        try:
            for x, kw in calib:
                fired.clear()
                try:
                    ad.forward(x, kw)
                except StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        shared = [n for n in names if n in st.packed_linears]
        perm = shared_act_order([hs[n].H for n in shared]) if st.act_order and len(shared) > 1 else None
        for n in names:
            lin = todo[n]
            t0 = time.perf_counter()
            w = lin.weight.data
            r = gptq_quantize(w, hs[n].H, st.bits, st.group_size, st.sym, st.act_order, st.static_groups, st.damp,
                              st.blocksize, st.min_zero, st.mse, perm=perm if n in shared else None,
                              group_order=st.group_order)
            _finish(res, prefix, n, lin, r, hs[n].H / 2, w.clone(), time.perf_counter() - t0)
            del hs[n]


def _awq_block(ad, prefix, calib, st, res, todo):
    linears = ad.linears()
    groups = ad.scale_groups()
    # 1. capture: the inputs (and call arguments) of every inspected module + every Linear's Gram matrix
    recs = {g.name: [] for g in groups}
    hs = {n: Hessian(lin.in_features, device=lin.weight.device) for n, lin in linears.items()}
    handles = []
    for g in groups:
        def make(gname):
            def hook(mod, args, kwargs):
                x, key = _first_tensor(args, kwargs)
                rest_args = args[1:] if key is None else args
                rest_kw = {k: v for k, v in kwargs.items() if k != key}
                recs[gname].append((x.detach(), (rest_args, rest_kw, key)))
            return hook
        handles.append(g.inspect.register_forward_pre_hook(make(g.name), with_kwargs=True))
    for n, lin in linears.items():
        def make_h(n):
            def hook(mod, args):
                hs[n].add(args[0])
            return hook
        handles.append(lin.register_forward_pre_hook(make_h(n)))
    try:
        with torch.no_grad():
            _run(ad, calib)
    finally:
        for h in handles:
            h.remove()
    # 2. scale search per group on the float block (every Linear of the group replaced by Q(W·s)/s)
    scales, infos = {}, {}
    for g in groups:
        members = [n for n in g.linears if n in todo]
        if not members:
            continue
        x_mean = torch.cat([x.reshape(-1, x.shape[-1]).abs().to(torch.float32) for x, _ in recs[g.name]]).mean(0)
        xs, ntok = [], 0
        for x, rec in recs[g.name]:  # the search runs ~21 forwards: on at most awq_search_tokens tokens
            if ntok >= st.awq_search_tokens:
                break
            xs.append((x, rec))
            ntok += x.numel() // x.shape[-1]
        with torch.no_grad():
            ref = torch.cat([_call_inspect(g.inspect, x, rec).to(torch.float32).reshape(-1) for x, rec in xs])
        weights = [linears[n].weight.data.clone() for n in members]

        def forward(effs, g=g, xs=xs, members=members, weights=weights):
            try:
                for n, e in zip(members, effs):
                    linears[n].weight.data = e.to(linears[n].weight.dtype)
                with torch.no_grad():
                    return torch.cat([_call_inspect(g.inspect, x, rec).to(torch.float32).reshape(-1) for x, rec in xs])
            finally:
                for n, w in zip(members, weights):
                    linears[n].weight.data = w

        s, info = search_scale(x_mean, weights, forward, ref, st.bits, st.group_size, st.sym, st.min_zero)
        scales[g.name] = s
        infos[g.name] = info
        del ref
    recs.clear()
    # 3. fold the scales exactly into the preceding ops; the Gram matrices follow (x → x / s)
    in_scale = {}
    for g in groups:
        if g.name not in scales:
            continue
        s = scales[g.name]
        fold_scale(g, linears, s)
        for n in g.linears:
            in_scale[n] = (s, g.name)
    # 4. clipping search + round-to-nearest
    for n, lin in todo.items():
        t0 = time.perf_counter()
        H = hs[n].H / 2
        extra = {}
        if n in in_scale:
            s, gname = in_scale[n]
            s = s.to(H.device)
            H = H / s[:, None] / s[None, :]
            extra = {"awq_group": gname, "awq_alpha": infos[gname]["alpha"]}
        W = lin.weight.data.to(torch.float32)
        clip = None if n in ad.no_clip else search_clip(W, H, st.bits, st.group_size, st.sym, st.min_zero)
        r = awq_finalize(W, st.bits, st.group_size, st.sym, clip, st.min_zero, lin.weight.dtype,
                         info=infos.get(in_scale.get(n, (None, None))[1], {}))
        _finish(res, prefix, n, lin, r, H, W, time.perf_counter() - t0, extra)


# ---------------------------------------------------------------------------------------------------- stacks
def quantize_stack(blocks, prefix: str, calib: Stream, st: QuantSettings, res: PipelineResult,
                   held: tuple[Stream, Stream] | None = None, feature_index: int | None = None,
                   desc: str = "blocks", snapshot_calib: bool = False):
    """Quantize ``blocks`` (an nn.ModuleList) in order. Returns ``(calib, held_float, held_quant, snapshots)``.

    ``feature_index``: after how many blocks to snapshot the streams (the feature a downstream consumer reads);
    ``snapshots`` holds ``{"held": (float, quant), "calib": calib}`` at that point.
    """
    from tqdm.auto import tqdm

    dev = torch.device(st.device)
    held_f, held_q = held if held is not None else (Stream(), Stream())
    snaps = {}
    if feature_index == 0:
        snaps = {"held": (held_f, held_q), "calib": calib}
    n = len(blocks)
    bar = tqdm(range(n), desc=f"{desc} [{st.method} W{st.bits} g{st.group_size}]", disable=not st.progress,
               unit="block", dynamic_ncols=True)
    for i in bar:
        check_interrupt()  # a Ctrl-C whose KeyboardInterrupt CPython swallowed (quantize._interrupt)
        blk = blocks[i]
        home = next(blk.parameters()).device
        blk.to(dev)
        ad = adapter_for(blk)
        t0 = time.perf_counter()
        with torch.no_grad():
            held_f = Stream((ad.forward(x, kw), kw) for x, kw in held_f)
        staged = _quantize_block(ad, f"{prefix}.{i}", calib, st, res)
        with torch.no_grad():
            # the staged GPTQ forward already produced the quantized block's outputs; RTN needs no calibration
            calib = staged if staged is not None else Stream((ad.forward(x, kw), kw) for x, kw in calib)
            held_q = Stream((ad.forward(x, kw), kw) for x, kw in held_q)
        row = {"block": f"{prefix}.{i}", "seconds": round(time.perf_counter() - t0, 3)}
        if held_f:
            row["heldout_sqnr_db"] = sqnr_db(torch.cat([x.reshape(-1) for x, _ in held_f]),
                                             torch.cat([x.reshape(-1) for x, _ in held_q]))
            bar.set_postfix(sqnr=f"{row['heldout_sqnr_db']:.1f}dB")
        res.blocks.append(row)
        blk.to(home)
        if feature_index is not None and i + 1 == feature_index:
            snaps = {"held": (held_f, held_q), "calib": calib}
    return calib, held_f, held_q, snaps
