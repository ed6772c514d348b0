"""GPTQ (Frantar et al.): second-order, column-by-column quantization with error feedback (docs/design.md §3).

* ``H = (2/N) Σ x xᵀ`` accumulated in fp32 over the calibration tokens (:class:`Hessian`, a running mean so
  batches of any size can be added).
* Dead input columns (``H_ii == 0``): weight column set to 0 and ``H_ii = 1``.
* Damping ``λ = damp · mean(diag H)`` (damp 0.01), retried with 10× more damping whenever the Cholesky
  factorization of ``H + λI`` fails (up to 1e4× mean diag), the damping actually used is reported.
* act-order (``desc_act``): columns processed in descending ``diag(H)``; groups are contiguous in that order
  (``g_idx`` permuted), or, with ``static_groups``, fitted on the natural groups before permuting (natural ``g_idx``).
* Blocks of ``blocksize`` (128) columns; inside a block every column is quantized, its scaled error
  ``(w − q) / [H⁻¹]_jj`` (upper Cholesky factor of ``H⁻¹``) updates the remaining columns of the block, and the
  block's accumulated error updates all later columns at once.
* Group parameters are (re)fitted from the current, already error-updated weights when a group starts; a partial
  last group is allowed (``in % group_size != 0``), as AutoGPTQ's ``g_idx`` does.
"""
from __future__ import annotations

import math

import torch

from ._threads import single_thread_on_cpu
from .result import QuantResult
from .rtn import check_bits_group, fit_params as fit_minmax, fit_params_mse

__all__ = ["Hessian", "gptq_quantize", "damped_inverse_cholesky", "group_aware_order", "shared_act_order"]


def _tri_blocks(n: int) -> int:
    """How many column blocks the lower-triangle Hessian update uses (1 = one full GEMM)."""
    return 4 if n >= 1024 else 2 if n >= 384 else 1


class Hessian:
    """Running ``H = (2/N) Σ x xᵀ`` in fp32 over the last dimension of every batch added.

    Wide inputs update only the blocks on and below the diagonal (``k`` column blocks: ``k(k+1)/2`` of ``k²`` block
    GEMMs, 62.5 % of the FLOPs for ``k = 4`` — the Hessians are a large part of GPTQ's calibration cost on a CPU), in
    place with ``addmm_`` (no scaled copy of ``x``); the upper triangle is mirrored when :attr:`H` is read.
    """

    def __init__(self, in_features: int, device=None, blocks: int | None = None):
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        self._lower_only = False  # only the blocks on and below the diagonal of _H are current
        k = max(1, min(in_features, blocks if blocks is not None else _tri_blocks(in_features)))
        edges = [round(i * in_features / k) for i in range(k + 1)]
        self._blocks = list(zip(edges[:-1], edges[1:]))

    @property
    def H(self) -> torch.Tensor:
        if self._lower_only:
            for i, (r0, r1) in enumerate(self._blocks):  # upper blocks := transposed lower blocks
                for c0, c1 in self._blocks[i + 1:]:
                    self._H[r0:r1, c0:c1].copy_(self._H[c0:c1, r0:r1].t())
            self._lower_only = False
        return self._H

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self._H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        if x.shape[1] != self._H.shape[0]:
            raise ValueError(f"Hessian: input has {x.shape[1]} features, expected {self._H.shape[0]}")
        total = self.n + m
        beta, alpha = self.n / total, 2.0 / total
        if len(self._blocks) == 1:
            # in place, no scaled copy of x: H ← (n/total)·H + (2/total)·xᵀx
            self._H.addmm_(x.t(), x, beta=beta, alpha=alpha)
        else:
            xt = x.t()
            for i, (r0, r1) in enumerate(self._blocks):
                for c0, c1 in self._blocks[:i + 1]:
                    self._H[r0:r1, c0:c1].addmm_(xt[r0:r1], x[:, c0:c1], beta=beta, alpha=alpha)
            self._lower_only = True
        self.n = total


def damped_inverse_cholesky(H: torch.Tensor, damp: float = 0.01, max_tries: int = 7) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp·mean(diag H)``; retries ×10 on failure.

    Returns ``(U, damp_used)``.
    """
    n = H.shape[0]
    mean_diag = float(torch.diag(H).mean())
    if not math.isfinite(mean_diag):
        raise ValueError("GPTQ: the Hessian contains NaN/Inf (calibration activations are not finite)")
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    d = damp
    for _ in range(max_tries):
        Hd = H + (d * mean_diag) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return U, d
        d *= 10.0
    raise RuntimeError(f"GPTQ: Cholesky failed even with damping {d / 10:g}·mean(diag H)")


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
                  act_order: bool = False, static_groups: bool = False, damp: float = 0.01, blocksize: int = 128,
                  min_zero: int = 0, mse: bool = False, perm: torch.Tensor | None = None,
                  cache: dict | None = None, group_order: bool = False) -> QuantResult:
    """GPTQ one Linear ``weight [out, in]`` given its Hessian ``H [in, in]`` (fp32; not modified).

    ``perm`` (with ``act_order``): the column order to use instead of ``argsort(diag H)`` — Linears that are stored
    as one packed tensor (InternLM2's ``wqkv``) share one order, so they share one ``g_idx``
    (see :func:`shared_act_order`).

    ``group_order`` (without ``act_order``): group-aware reordering (GAR, Gafni et al., CVPRW 2025; GPTQModel's
    ``act_group_aware``): the groups are processed in descending order of their largest ``diag(H)`` and the columns of
    each group in descending ``diag(H)``, each group's parameters fitted from its error-updated columns when it
    starts. Every group keeps its own columns, so ``g_idx`` stays natural: the folder is an ordinary no-``desc_act``
    one that every kernel loads (see :func:`group_aware_order`).

    ``mse``: fit each group's range by AutoGPTQ's MSE grid search (:func:`quantize.rtn.fit_params_mse`) instead of
    plain min/max. ``cache``: a dict shared by Linears with the same ``H`` (same input): the damped inverse
    Cholesky factor (and column order) is computed once and reused.
    """
    with single_thread_on_cpu(weight.device):
        return _gptq_quantize(weight, H, bits, group_size, sym, act_order, static_groups, damp, blocksize, min_zero,
                              mse, perm, cache, group_order)


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """GAR's column order for natural groups of ``group_size`` (a partial last group allowed): groups by descending
    largest ``diag``, columns inside each group by descending ``diag`` (ties keep the natural order)."""
    n = diag.numel()
    starts = list(range(0, n, group_size))
    d = diag.to(torch.float64)
    peak = torch.stack([d[s:s + group_size].max() for s in starts])
    order = torch.argsort(peak, descending=True, stable=True).tolist()
    return torch.cat([starts[g] + torch.argsort(d[starts[g]:starts[g] + group_size], descending=True, stable=True)
                      for g in order])


def shared_act_order(hessians) -> torch.Tensor:
    """One act-order column order for Linears that read the same input and are stored packed: descending diagonal
    of the summed Hessians (the Hessian of the merged Linear when they are equal)."""
    d = None
    for H in hessians:
        h = torch.diag(H).to(torch.float64)
        d = h if d is None else d + h.to(d.device)
    return torch.argsort(d, descending=True, stable=True)


def _gptq_quantize(weight, H, bits, group_size, sym, act_order, static_groups, damp, blocksize, min_zero, mse=False,
                   perm_in=None, cache=None, group_order=False):
    if mse:
        def fit_params(w, bits, sym, style, min_zero):  # the MSE variant for every group fit
            return fit_params_mse(w, bits, sym, min_zero)
    else:
        fit_params = fit_minmax
    out_f, in_f = weight.shape
    gs = check_bits_group(bits, group_size, in_f)
    if H.shape != (in_f, in_f):
        raise ValueError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match in_features={in_f}")
    dev = weight.device
    W = weight.detach().to(torch.float32).clone()
    H = H.detach().to(dev, torch.float32).clone()
    if not bool(torch.isfinite(W).all()):
        raise ValueError("GPTQ: weight contains NaN/Inf")

    dead = torch.diag(H) == 0
    n_dead = int(dead.sum())
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    ngroups = -(-in_f // gs)
    no_groups = group_size in (-1, None, 0)
    group_order = bool(group_order) and not act_order and not no_groups and ngroups > 1
    static = None
    if static_groups and not no_groups:
        static = [fit_params(W[:, c:c + gs], bits, sym, "gptq", min_zero) for c in range(0, in_f, gs)]

    perm = None
    # Linears sharing H (same input) share the factorization; the column order is part of the key
    ckey = (float(damp), bool(act_order), group_order, gs,
            None if (perm_in is None or not act_order) else tuple(perm_in.tolist()))
    if cache is not None and ckey in cache:
        U, damp_used, perm = cache[ckey]
        if perm is not None:
            W = W[:, perm]
    else:
        if act_order:
            if perm_in is not None:
                perm = perm_in.to(dev, torch.long)
                if perm.shape != (in_f,) or not torch.equal(torch.sort(perm).values, torch.arange(in_f, device=dev)):
                    raise ValueError(f"GPTQ: perm must be a permutation of range({in_f})")
            else:
                perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        elif group_order:
            perm = group_aware_order(torch.diag(H), gs).to(dev)
        if perm is not None:
            W = W[:, perm]
            H = H[perm][:, perm]
        U, damp_used = damped_inverse_cholesky(H, damp)
        if cache is not None:
            cache[ckey] = (U, damp_used, perm)
    del H

    # Work on Wᵀ [in, out]: a column of W is a contiguous row, and every update is one BLAS call.
    Wt = W.t().contiguous()
    del W
    Qt = torch.empty_like(Wt)  # codes, in processing order
    scales = torch.zeros(ngroups, out_f, dtype=torch.float32, device=dev)
    zeros = torch.zeros(ngroups, out_f, dtype=torch.float32, device=dev)
    # g_list: group of the column processed at position t; fits: the positions where a group's parameters are
    # fitted -> (end position, group) (python ints: no per-column tensor indexing)
    fits = {}
    if no_groups:
        g_list = [0] * in_f
    elif static is not None or group_order:
        src = perm.tolist() if perm is not None else range(in_f)
        g_list = [c // gs for c in src]
        if group_order and static is None:  # each group is one contiguous run of positions
            t = 0
            while t < in_f:
                g = g_list[t]
                n = min(gs, in_f - g * gs)
                fits[t] = (t + n, g)
                t += n
    else:  # natural order or act-order: groups are consecutive runs of gs positions
        g_list = [t // gs for t in range(in_f)]
        fits = {t: (min(t + gs, in_f), t // gs) for t in range(0, in_f, gs)}
    loss = torch.zeros(out_f, dtype=torch.float32, device=dev)
    maxq = float((1 << bits) - 1)
    diag = torch.diagonal(U).tolist()

    s_cur = z_cur = None
    if no_groups:
        s_cur, z_cur = fit_params(Wt.t(), bits, sym, "gptq", min_zero)
        scales[0], zeros[0] = s_cur, z_cur
    elif static is not None:
        for g, (sg, zg) in enumerate(static):
            scales[g], zeros[g] = sg, zg

    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        Err1 = torch.empty(i2 - i1, out_f, dtype=torch.float32, device=dev)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                s_cur, z_cur = static[g_list[col]]
            elif col in fits:
                # fit once per group, on the current columns: the in-block part already error-updated in place,
                # anything past the block updated by all previous blocks
                end, g = fits[col]
                s_cur, z_cur = fit_params(Wt[col:end].t(), bits, sym, "gptq", min_zero)
                scales[g], zeros[g] = s_cur, z_cur
            w = Wt[col]
            q = torch.div(w, s_cur).round_().add_(z_cur).clamp_(0.0, maxq)
            Qt[col] = q
            # the error fed back is against the value the stored (fp16-exact) scale and integer zero decode to
            err = w - q.sub_(z_cur).mul_(s_cur)
            err.div_(diag[col])
            Err1[i] = err
            if i + 1 < i2 - i1:
                Wt[col + 1:i2].addr_(U1[i, i + 1:], err, alpha=-1.0)
        loss += Err1.square().sum(0) / 2
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)

    Q = Qt.t()
    g_proc = torch.tensor(g_list, dtype=torch.int64, device=dev)
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        g_idx = g_proc[invperm]
    else:
        g_idx = g_proc
    res = QuantResult(Q.to(torch.int32), scales, zeros.to(torch.int32), g_idx.to(torch.int32), bits=bits,
                      group_size=group_size if group_size not in (None, 0) else -1, sym=sym, method="gptq",
                      dtype=weight.dtype, perm=perm, static_groups=bool(static_groups),
                      info={"damp": damp_used, "dead_columns": n_dead, "gptq_loss": float(loss.sum()),
                            "group_order": group_order})
    return res
