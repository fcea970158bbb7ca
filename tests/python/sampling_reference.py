"""Independent numpy / Python-integer references of the sampling rules (kernels/include/rtllm/kernels/
sampling.cuh and sampling_math.h), shared by the CPU and GPU sampling tests.

- `float64_distribution`: the distribution the rules approximate, in float64 (the kept set of top-k /
  top-p / min-p computed on float64 probabilities).
- `prob_exp`, `masses`, `reference_token`: the exact rules, re-derived here from the documented
  arithmetic (float32 steps emulated with numpy, the fused multiply-adds made exact by TwoSum, the
  masses and thresholds in Python integers), so the samplers' decisions can be checked bit for bit.
"""
import numpy as np

MASS_BITS = 33
F32 = np.float32


def splitmix_bits(seed, step):
    """The 53 random bits of sampling_uniform(seed, step)."""
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    return mix((mix(seed & mask) + ((step + 1) * 0x9E3779B97F4A7C15)) & mask) >> 11


def fma32(a, b, c):
    """Correctly rounded float32 a · b + c (arrays broadcast): the product is exact in float64, the sum
    is exact as s + e (TwoSum); s rounds to float32 like s + e unless s lies exactly halfway between
    two floats, where the sign of e decides."""
    a, b, c = (np.asarray(x, F32).astype(np.float64) for x in (a, b, c))
    ab = a * b
    s = ab + c
    bb = s - ab
    e = (ab - (s - bb)) + (c - bb)
    f = s.astype(F32)
    fd = f.astype(np.float64)
    up = np.nextafter(f, F32(np.inf)).astype(np.float64)
    down = np.nextafter(f, F32(-np.inf)).astype(np.float64)
    # s exactly halfway: between f and its neighbour on the side of s.
    other = np.where(s > fd, up, down)
    halfway = (e != 0) & (s != fd) & (2 * s == fd + other)
    toward = np.where(s > fd, e > 0, e < 0)  # the true value lies beyond s, away from f
    return np.where(halfway & toward, other, fd).astype(F32)


def prob_exp(x):
    """sampling_math.h's prob_exp on float32 x <= 0, emulated step by step."""
    with np.errstate(all="ignore"):  # -inf and NaN inputs give 0 below
        return _prob_exp(np.asarray(x, F32))


def _prob_exp(x):
    big = F32(12582912.0)
    k = (fma32(x, F32(1.44269502162933349609375), big) - big).astype(F32)
    r = fma32(k, F32(-0.693147182464599609375), x)
    r = fma32(k, F32(1.904654323148236e-09), r)
    q = np.full_like(x, F32(1.0) / F32(5040.0))
    for c in [F32(1.0) / F32(720.0), F32(1.0) / F32(120.0), F32(1.0) / F32(24.0), F32(1.0) / F32(6.0), F32(0.5),
              F32(1.0), F32(1.0)]:
        q = fma32(q, r, c)
    ki = np.where(x >= -24, k, 0).astype(np.int64)
    scale = np.ldexp(np.ones_like(q, dtype=np.float64), ki).astype(F32)  # 2^k, exact
    p = (q * scale).astype(F32)
    return np.where(x >= F32(-24.0), p, F32(0.0)).astype(F32)


def masses(adjusted, temperature):
    """Integer masses (Python ints) of float32 adjusted logits: floor(prob_exp(x) · 2^33)."""
    a = np.asarray(adjusted, F32)
    m = a.max()
    with np.errstate(all="ignore"):  # 1 / a denormal temperature is inf; -inf logits give -inf
        inv_t = F32(1.0) / F32(temperature)
        x = np.where(a == m, F32(0.0), ((a - m).astype(F32) * inv_t).astype(F32)).astype(F32)
    p = prob_exp(np.where(np.isfinite(x), x, F32(-np.inf)))
    return [int(v) for v in np.floor(p.astype(np.float64) * 2.0 ** MASS_BITS)]


def ceil_mul_float(total, value):
    """ceil(total · value) exactly, for a float32 value."""
    num, den = float(F32(value)).as_integer_ratio()
    return -((-total * num) // den)


def kept_tokens(adjusted, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The kept ids (ascending) and their masses under the exact rules."""
    a = np.asarray(adjusted, F32)
    mass = masses(a, temperature)
    cand = [i for i in range(len(a)) if mass[i] > 0]
    order = sorted(cand, key=lambda i: (-float(a[i]), i))  # logit desc (-0 == +0), id asc
    keep = order
    if 0 < top_k < len(cand):
        keep = order[:top_k]
    if F32(top_p) < 1:
        total = sum(mass[i] for i in keep)
        threshold = ceil_mul_float(total, top_p)
        acc, n = 0, 0
        while n < len(keep) and acc < threshold:
            acc += mass[keep[n]]
            n += 1
        keep = keep[:max(n, 1)]
    if min_p > 0:
        least = ceil_mul_float(1 << MASS_BITS, min_p)
        keep = [i for i in keep if mass[i] >= least]
    keep = sorted(keep)
    return keep, [mass[i] for i in keep]


def reference_token(adjusted, temperature, seed, step, top_k=0, top_p=1.0, min_p=0.0):
    """The token the rules draw (-1 when every logit is -inf); greedy for temperature 0."""
    a = np.asarray(adjusted, F32)
    if not np.any(a > -np.inf):
        return -1
    if temperature == 0:
        return int(np.argmax(a))
    keep, mass = kept_tokens(a, temperature, top_k, top_p, min_p)
    total = sum(mass)
    target = (splitmix_bits(seed, step) * total) >> 53
    acc = 0
    for i, m in zip(keep, mass):
        acc += m
        if target < acc:
            return i
    raise AssertionError("target beyond the kept mass")


def float64_distribution(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution the sampler must draw from, in float64."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    order = np.lexsort((np.arange(len(p)), -p))
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        cumulative = np.cumsum(q[order])
        cutoff = int(np.searchsorted(cumulative, top_p)) + 1  # the smallest prefix reaching top_p
        keep[order[cutoff:]] = False
    if min_p > 0.0:
        keep &= p >= min_p * p.max()
    p = np.where(keep, p, 0.0)
    return p / p.sum()
