"""GPTQ (Frantar et al., 2022): weight-only quantization that quantizes one input column at a time and
moves each column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian
of the layer's squared output error, H = 2 XᵀX over the calibration inputs X of the linear.

numpy only (float64). As in the reference implementation: dead inputs (H[k, k] = 0) get H[k, k] = 1 and
zero weights; damping 0.01 · mean(diag H) on the diagonal; the upper Cholesky factor U of H⁻¹ drives the
updates (w_k's error / U[k, k] times U[k, k:]), in blocks of 128 columns with the block's accumulated
error applied to the remaining columns at its end.

Groups: without desc_act a group's scale (and zero point) is computed when its first column is reached,
from the group's current (already updated) weights. With desc_act the columns are processed by
decreasing H[k, k] but the groups stay those of the original column order ("static groups", computed
from the original weights up front), so the engine needs no g_idx: the result is ordinary
weight_only_linear codes / scales / offsets. group_size == K is per output channel.

The grid is rtllm's own weight-only one (quantize.py): 4 bits symmetric q in [-8, 7] with scale amax / 7,
8 bits symmetric q in [-127, 127] with scale amax / 127; asymmetric u in [0, 2^bits - 1] with the range
[min(w, 0), max(w, 0)], integer zero point z, stored q = u - 2^(bits-1) and offset (2^(bits-1) - z) · scale.
Scales are rounded to the stored dtype (float16 for 4 bits, float32 for 8 bits) before they are used.
Each group's range is searched, not taken from its extremes: see SHRINK_STEPS.
"""
import numpy as np

BLOCK = 128
DAMP = 0.01


def _stored_scale(x: np.ndarray, bits: int) -> np.ndarray:
    """float64 scales -> the stored ones as float64 (float16 for 4 bits, float32 for 8; 1 for 0)."""
    from .quantize import _fp16_scale

    if bits == 4:
        return _fp16_scale(x.astype(np.float32)).astype(np.float64)
    s = x.astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float64)


# The grid's range search: each row's range [lo, hi] is shrunk by the factors 1, 1 - 1/SHRINK_STEPS, ...,
# down to 1 - MAX_SHRINK, and the one with the least Σ |w - ŵ|^ERROR_NORM over the group is kept (the
# reference implementation's `mse` option, with its norm 2.4: between the squared error and the maximum).
# A clipped outlier costs its own error once, a wide grid costs every other weight of the group a coarser
# step: on 4-bit groups of 32 to 128 the search usually clips a little.
SHRINK_STEPS = 100
MAX_SHRINK = 0.2
ERROR_NORM = 2.4


class _Grid:
    """One group's quantization grid for every output row: scale [N], zero [N] (asymmetric) or None,
    with the range of each row that quantizes the group's weights `w` [N, G] best (see SHRINK_STEPS)."""

    def __init__(self, w: np.ndarray, bits: int, sym: bool):
        self.bits, self.sym = bits, sym
        self.mid = 2 ** (bits - 1)
        if sym:
            self.lo, self.hi = -self.mid, self.mid - 1
            if bits == 8:
                self.lo = -self.hi  # [-127, 127], as rtllm's W8A16
        else:
            self.lo, self.hi = 0, 2 ** bits - 1
        amax = np.max(np.abs(w), axis=1)
        w_lo, w_hi = np.minimum(w.min(axis=1), 0), np.maximum(w.max(axis=1), 0)
        best = None
        for step in range(int(MAX_SHRINK * SHRINK_STEPS) + 1):
            p = 1.0 - step / SHRINK_STEPS
            self._set_range(p * amax, p * w_lo, p * w_hi)
            err = np.sum(np.abs(self.dequant(self.codes_of(w)) - w) ** ERROR_NORM, axis=1)
            if best is None:
                best, scale, zero = err, self.scale, self.zero
                continue
            better = err < best
            best = np.where(better, err, best)
            scale = np.where(better, self.scale, scale)
            zero = None if sym else np.where(better, self.zero, zero)
        self.scale, self.zero = scale, zero

    def _set_range(self, amax: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        if self.sym:
            self.scale = _stored_scale(amax / self.hi, self.bits)
            self.zero = None
        else:
            self.scale = _stored_scale((hi - lo) / self.hi, self.bits)
            self.zero = np.clip(np.rint(-lo / self.scale), 0, self.hi)

    def codes_of(self, w: np.ndarray) -> np.ndarray:
        """codes() of every column of w [N, G]."""
        q = np.rint(w / self.scale[:, None])
        if self.zero is not None:
            q = q + self.zero[:, None]
        return np.clip(q, self.lo, self.hi)

    def codes(self, col: np.ndarray) -> np.ndarray:
        """Integer codes of a column (float64 [N]): q (symmetric) or u (asymmetric)."""
        q = np.rint(col / self.scale)
        if self.zero is not None:
            q = q + self.zero
        return np.clip(q, self.lo, self.hi)

    def dequant(self, q: np.ndarray) -> np.ndarray:
        """Codes -> weights; q [N] (one column) or [N, G] (columns)."""
        s = self.scale if q.ndim == 1 else self.scale[:, None]
        if self.zero is None:
            return q * s
        return (q - (self.zero if q.ndim == 1 else self.zero[:, None])) * s


def upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper triangular U with Uᵀ U = h⁻¹, from one Cholesky factorization: with P the order reversal and
    P h P = L Lᵀ, h⁻¹ = (P L⁻ᵀ P)(P L⁻¹ P) and P L⁻¹ P is upper triangular."""
    L = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(np.linalg.inv(L)[::-1, ::-1])


def gptq_quantize(w: np.ndarray, h: np.ndarray, bits: int, group_size: int, sym: bool, desc_act: bool = False,
                  block: int = BLOCK, damp: float = DAMP) -> tuple:
    """w [N, K] (float), h [K, K] = Σ xᵀx over calibration rows (any positive multiple of it) ->
    (codes int8 [N, K] (int4 codes in [-8, 7] or int8), scale [N, K / group_size] (float16 for 4 bits,
    float32 for 8), offset [N, K / group_size] float32 or None when sym)."""
    W = np.array(w, dtype=np.float64)
    N, K = W.shape
    if K % group_size:
        raise ValueError(f"GPTQ: K={K} is not a multiple of group_size={group_size}")
    H = np.array(h, dtype=np.float64)
    if H.shape != (K, K):
        raise ValueError(f"GPTQ: the Hessian has shape {list(H.shape)}, expected [{K}, {K}]")
    if not np.all(np.isfinite(H)):
        raise ValueError("GPTQ: the calibration Hessian is not finite (the model's activations are not)")
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = K // group_size
    grids = [None] * n_groups
    if desc_act:  # static groups, from the original weights
        grids = [_Grid(W[:, g * group_size:(g + 1) * group_size], bits, sym) for g in range(n_groups)]
        perm = np.argsort(-np.diag(H), kind="stable")
    else:
        perm = np.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    H[np.diag_indices(K)] += damp * np.mean(np.diag(H))
    U = upper_cholesky_of_inverse(H)
    Q = np.zeros((N, K))
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i]
            g = col // group_size
            if grids[g] is None:  # in order: the group starts here, its columns are [i, i + group_size)
                grids[g] = _Grid(W1[:, i:i + group_size] if i + group_size <= i2 - i1
                                 else W[:, i1 + i:i1 + i + group_size], bits, sym)
            q = grids[g].codes(W1[:, i])
            Q[:, i1 + i] = q
            err = (W1[:, i] - grids[g].dequant(q)) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    codes = np.empty((N, K))
    codes[:, perm] = Q
    scale = np.stack([grid.scale for grid in grids], axis=1)
    if sym:
        offset = None
    else:
        mid = 2 ** (bits - 1)
        codes = codes - mid
        offset = ((mid - np.stack([grid.zero for grid in grids], axis=1)) * scale).astype(np.float32)
    return codes.astype(np.int8), scale.astype(np.float16 if bits == 4 else np.float32), offset


def dequantize(codes: np.ndarray, scale: np.ndarray, offset) -> np.ndarray:
    """float64 W = q · scale + offset per group (docs/engine_format.md, weight_only_linear)."""
    N, K = codes.shape
    G = K // scale.shape[1]
    w = codes.astype(np.float64) * np.repeat(scale.astype(np.float64), G, axis=1)
    if offset is not None:
        w += np.repeat(offset.astype(np.float64), G, axis=1)
    return w
