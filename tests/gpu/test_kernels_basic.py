"""The CUDA kernels against float64 references on fresh random inputs.

Bounds: ‖out − ref‖ / ‖ref‖ <= 1e-2 for bf16 outputs and 2e-3 for fp16 outputs (one rounding of the
output plus bf16/fp16 inputs); float32 outputs <= 1e-6. Outputs are poisoned with NaN before each
launch, so an unwritten element fails the finiteness check.
"""
import pytest
import torch

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]


def code(kernels, dtype):
    return kernels.BF16 if dtype == torch.bfloat16 else kernels.FP16


def rand(*shape, dtype=torch.bfloat16, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).cuda()


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def rel_err(out, ref):
    out = out.detach().double().cpu()
    ref = torch.as_tensor(ref).double().cpu()
    assert torch.isfinite(out).all(), "an output element was not written (NaN poison left)"
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def d(t):
    return t.data_ptr()


def rms_ref(x, w, group, eps):
    x = x.double().cpu()
    shape = x.shape
    g = x.reshape(-1, group)
    return (g / torch.sqrt((g * g).mean(-1, keepdim=True) + eps) * w.double().cpu()).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,group", [(1, 64, 64), (7, 4096, 4096), (3, 8192, 8192), (5, 1024, 128),
                                               (4, 256, 16), (2, 4096, 512), (9, 2048, 2048)])
def test_rms_norm(kernels, stream, dtype, rows, hidden, group):
    x, w = rand(rows, hidden, dtype=dtype, scale=3.0), rand(group, dtype=dtype) + 1.0
    out = poisoned(rows, hidden, dtype=dtype)
    kernels.rms_norm(d(out), d(x), d(w), rows, hidden, group, 1e-5, code(kernels, dtype), stream)
    assert rel_err(out, rms_ref(x, w, group, 1e-5)) <= TOL[dtype]
    # In place (out aliases x).
    ref = rms_ref(x, w, group, 1e-5)
    kernels.rms_norm(d(x), d(x), d(w), rows, hidden, group, 1e-5, code(kernels, dtype), stream)
    assert rel_err(x, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (6, 4096), (2, 8192), (17, 1000 - 1000 % 8),
                                        (1, 16384)])  # rows kept in registers up to 8192, then re-read
def test_add_rms_norm(kernels, stream, dtype, rows, hidden):
    x, res, w = rand(rows, hidden, dtype=dtype), rand(rows, hidden, dtype=dtype, scale=2.0), rand(hidden, dtype=dtype)
    normed, total = poisoned(rows, hidden, dtype=dtype), poisoned(rows, hidden, dtype=dtype)
    kernels.add_rms_norm(d(normed), d(total), d(x), d(res), d(w), rows, hidden, 1e-6, code(kernels, dtype), stream)
    rounded_sum = (x.float() + res.float()).to(dtype)  # one rounding of the float32 sum
    assert torch.equal(total, rounded_sum)
    assert rel_err(normed, rms_ref(rounded_sum, w, hidden, 1e-6)) <= TOL[dtype]
    # sum aliasing residual, as the runtime uses it.
    res2 = res.clone()
    kernels.add_rms_norm(d(normed), d(res2), d(x), d(res2), d(w), rows, hidden, 1e-6, code(kernels, dtype), stream)
    assert torch.equal(res2, rounded_sum)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [8, 4096 * 3, 1001, 77777])  # vector and scalar paths
def test_add_mul_silu(kernels, stream, dtype, n):
    a, b = rand(n, dtype=dtype, scale=4.0), rand(n, dtype=dtype)
    for name, ref in [("add", a.double() + b.double()), ("mul", a.double() * b.double())]:
        out = poisoned(n, dtype=dtype)
        getattr(kernels, name)(d(out), d(a), d(b), n, code(kernels, dtype), stream)
        assert rel_err(out, ref) <= TOL[dtype], name
    out = poisoned(n, dtype=dtype)
    kernels.silu(d(out), d(a), n, code(kernels, dtype), stream)
    assert rel_err(out, torch.nn.functional.silu(a.double())) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 14336), (5, 512), (3, 100)])
def test_silu_mul(kernels, stream, dtype, rows, inter):
    x = rand(rows, 2 * inter, dtype=dtype, scale=3.0)
    out = poisoned(rows, inter, dtype=dtype)
    kernels.silu_mul(d(out), d(x), rows, inter, code(kernels, dtype), stream)
    ref = torch.nn.functional.silu(x[:, :inter].double()) * x[:, inter:].double()
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 4096, 100])
def test_embedding_and_gather(kernels, stream, dtype, hidden):
    vocab, num = 1000, 37
    table = rand(vocab, hidden, dtype=dtype)
    ids = torch.randint(0, vocab, (num,), dtype=torch.int32, device="cuda")
    out = poisoned(num, hidden, dtype=dtype)
    kernels.embedding(d(out), d(ids), d(table), num, hidden, vocab, code(kernels, dtype), stream)
    assert torch.equal(out, table[ids.long()])
    out = poisoned(num, hidden, dtype=dtype)
    kernels.gather_rows(d(out), d(table), d(ids), num, hidden, vocab, code(kernels, dtype), stream)
    assert torch.equal(out, table[ids.long()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cast_to_float(kernels, stream, dtype):
    x = rand(3, 32001, dtype=dtype, scale=10.0)
    out = torch.full((3, 32001), float("nan"), device="cuda")
    kernels.cast_to_float(d(out), d(x), x.numel(), code(kernels, dtype), stream)
    assert torch.equal(out, x.float())


def rope_ref(x, positions, inv_freq, num_heads, head_dim):
    """Rotate-half RoPE in float64 with the angle rounded to float32 like the kernels."""
    t = x.double().cpu().reshape(x.shape[0], num_heads, head_dim)
    f = (positions.float().cpu()[:, None] * inv_freq.cpu()[None, :]).double()  # float32 product
    c, s = torch.cos(f)[:, None, :], torch.sin(f)[:, None, :]
    half = head_dim // 2
    x1, x2 = t[..., :half], t[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).reshape(x.shape[0], -1)


def prepare_ref(x, num_heads, head_dim, norm_weight, positions, inv_freq, eps=1e-6):
    """qkv_prepare's transform of [tokens, num_heads * head_dim]: per-head RMSNorm (if a weight), then RoPE
    (if inv_freq), in float64."""
    if norm_weight is not None:
        x = rms_ref(x, norm_weight, head_dim, eps)
    if inv_freq is not None:
        x = rope_ref(x, positions, inv_freq, num_heads, head_dim)
    return x.double().cpu()


def inv_freq_for(head_dim, theta=10000.0):
    return (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float().cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,num_heads", [(16, 3), (64, 8), (128, 32), (80, 5), (96, 3)])
def test_rope(kernels, stream, dtype, head_dim, num_heads):
    tokens = 23
    x = rand(tokens, num_heads * head_dim, dtype=dtype)
    positions = torch.randint(0, 5000, (tokens,), dtype=torch.int32, device="cuda")
    inv_freq = inv_freq_for(head_dim)
    out = poisoned(tokens, num_heads * head_dim, dtype=dtype)
    kernels.rope(d(out), d(x), d(positions), d(inv_freq), tokens, num_heads, head_dim, code(kernels, dtype), stream)
    ref = rope_ref(x, positions, inv_freq, num_heads, head_dim)
    assert rel_err(out, ref) <= TOL[dtype]
    kernels.rope(d(x), d(x), d(positions), d(inv_freq), tokens, num_heads, head_dim, code(kernels, dtype), stream)
    assert rel_err(x, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads,tpb", [
    (16, 4, 4, 16), (64, 8, 2, 32), (128, 32, 8, 64), (128, 32, 4, 16), (64, 4, 1, 64), (80, 8, 2, 16),
    (96, 12, 4, 32)])
@pytest.mark.parametrize("rope,qk_norm", [(True, False), (True, True), (False, False)])
def test_qkv_prepare(kernels, stream, dtype, head_dim, num_heads, num_kv_heads, tpb, rope, qk_norm):
    gen = torch.Generator().manual_seed(head_dim * 1000 + num_heads * 10 + tpb)
    num_cached = [0, 37, 5 * tpb + 3, 130]  # new tokens after a cached prefix spanning many blocks
    num_new = [19, 1, 2 * tpb + 5, 1]
    seq_len = [c + n for c, n in zip(num_cached, num_new)]
    max_blocks = max((n + tpb - 1) // tpb for n in seq_len) + 1
    num_blocks = len(seq_len) * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=gen)  # blocks in shuffled order
    block_table = perm[: len(seq_len) * max_blocks].reshape(len(seq_len), max_blocks).to(torch.int32).cuda()
    token_seq = torch.cat([torch.full((n,), s, dtype=torch.int32) for s, n in enumerate(num_new)]).cuda()
    positions = torch.cat([torch.arange(c, c + n, dtype=torch.int32) for c, n in zip(num_cached, num_new)]).cuda()
    tokens = token_seq.numel()
    q_w, kv_w = num_heads * head_dim, num_kv_heads * head_dim
    stride = q_w + 2 * kv_w + 8  # a row stride wider than q|k|v
    qkv = rand(tokens, stride, dtype=dtype, scale=2.0, gen=gen)
    inv_freq = inv_freq_for(head_dim, theta=500000.0) if rope else None
    q_norm = rand(head_dim, dtype=dtype, gen=gen) + 1.0 if qk_norm else None
    k_norm = rand(head_dim, dtype=dtype, gen=gen) + 1.0 if qk_norm else None
    pool = poisoned(num_blocks, 2, num_kv_heads, tpb, head_dim, dtype=dtype)
    q_out = poisoned(tokens, q_w, dtype=dtype)
    kernels.qkv_prepare(d(q_out), d(qkv), stride, 0, q_w, q_w + kv_w, d(inv_freq) if rope else 0,
                        d(q_norm) if qk_norm else 0, d(k_norm) if qk_norm else 0, 1e-6, token_seq=d(token_seq),
                        positions=d(positions), num_tokens=tokens, num_seqs=len(seq_len), kv_data=d(pool),
                        num_blocks=num_blocks, tokens_per_block=tpb, block_table=d(block_table),
                        max_blocks_per_seq=max_blocks, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, dtype=code(kernels, dtype), stream=stream)

    q_ref = prepare_ref(qkv[:, :q_w], num_heads, head_dim, q_norm, positions, inv_freq)
    k_ref = prepare_ref(qkv[:, q_w:q_w + kv_w], num_kv_heads, head_dim, k_norm, positions,
                        inv_freq).reshape(tokens, num_kv_heads, head_dim)
    v_ref = qkv[:, q_w + kv_w:q_w + 2 * kv_w].double().cpu().reshape(tokens, num_kv_heads, head_dim)
    assert rel_err(q_out, q_ref) <= TOL[dtype]
    pool_cpu = pool.cpu()
    written = torch.zeros(num_blocks, tpb, dtype=torch.bool)
    bt = block_table.cpu()
    k_got, v_got = [], []
    for t in range(tokens):
        s, p = int(token_seq[t]), int(positions[t])
        b = int(bt[s, p // tpb])
        written[b, p % tpb] = True
        k_got.append(pool_cpu[b, 0, :, p % tpb])
        v_got.append(pool_cpu[b, 1, :, p % tpb])
    assert rel_err(torch.stack(k_got), k_ref) <= TOL[dtype]
    assert torch.equal(torch.stack(v_got).double(), v_ref)  # v is copied unchanged
    # Nothing else in the pool was touched.
    untouched = pool_cpu.permute(0, 3, 1, 2, 4)[~written]
    assert torch.isnan(untouched.float()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias,float_out", [
    (1, 4096, 4096, False, False), (1, 1000, 14336, True, False), (3, 777, 520, True, False),
    (8, 512, 4096, False, False), (5, 64, 8, True, False), (2, 3000, 2048, False, False),
    (1, 5003, 4096, False, True), (4, 300, 1024, True, True),  # float32 out: an LM head's logits
    # 9 to 64 tokens: two 8-token halves of a 16-token block, several blocks, a last block part full
    (9, 200, 264, True, False), (16, 1000, 1024, False, False), (33, 129, 4104, True, True),
    (64, 2048, 512, False, False),
    # N large enough for fewer warps per weight row group to split K (8, 4, 2, 1 by N), and K tails
    (1, 7000, 264, True, False), (12, 13000, 256, False, True), (40, 26000, 136, True, False)])
def test_gemv(kernels, stream, dtype, m, n, k, bias, float_out):
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=0.05)
    b = rand(n, dtype=dtype) if bias else None
    y = poisoned(m, n, dtype=torch.float32 if float_out else dtype)
    assert kernels.gemv_supported(m, k)
    kernels.gemv(d(y), d(x), d(w), d(b) if bias else 0, m, n, k, code(kernels, dtype), stream,
                 y_dtype=kernels.FP32 if float_out else -1)
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)
    # float32 output skips the final rounding to bf16/fp16: only the float32 accumulation error remains
    assert rel_err(y, ref) <= (1e-5 if float_out else TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias,float_out", [
    # up to 64 tokens the GEMV or cuBLASLt, as timed on the first call of each shape (both paths run then)
    (1, 4096, 4096, False, False), (16, 1000, 1024, True, False),
    (17, 1000, 1024, True, False), (24, 4096, 4096, False, False), (64, 2048, 512, False, True),
    (65, 2048, 512, True, False),  # cuBLASLt
    # rows of y not 16-byte aligned, which cuBLASLt refuses: the GEMV on blocks of up to 64 tokens
    (200, 333, 256, True, True), (100, 1001, 512, False, False)])
def test_linear_op_path(kernels, stream, dtype, m, n, k, bias, float_out):
    """The linear op's own path (the GEMV or cuBLASLt up to 64 tokens, cuBLASLt beyond; the GEMV in blocks
    where cuBLASLt cannot take the rows) against float64."""
    dt = "BF16" if dtype == torch.bfloat16 else "F16"
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=0.05)
    b = rand(n, dtype=dtype) if bias else None
    y = poisoned(m, n, dtype=torch.float32 if float_out else dtype)
    kernels.linear(d(y), d(x), d(w), d(b) if bias else 0, m, n, k, dt, "F32" if float_out else dt, stream)
    torch.cuda.synchronize()
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)
    assert rel_err(y, ref) <= (1e-5 if float_out else TOL[dtype])


@pytest.mark.parametrize("m", [1, 8, 16, 32, 64])
def test_linear_op_keeps_its_timed_choice(kernels, stream, m):
    """The first call of a shape times both paths; later calls run the path it chose: the same bits as the
    first call's output (the two paths round differently)."""
    n, k = 3072, 2048
    x, w = rand(m, k), rand(n, k, scale=0.05)
    outputs = []
    for _ in range(3):
        y = poisoned(m, n, dtype=torch.float32)
        kernels.linear(d(y), d(x), d(w), 0, m, n, k, "BF16", "F32", stream)
        torch.cuda.synchronize()
        outputs.append(y)
    assert rel_err(outputs[0], x.double() @ w.double().T) <= 1e-5
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_linear_op_refuses_bad_arguments(kernels, stream):
    x, w = rand(4, 64), rand(64, 64)
    y = poisoned(4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="is not BF16 or F16"):
        kernels.linear(d(y), d(x), d(w), 0, 4, 64, 64, "F32", "F32", stream)
    with pytest.raises(ValueError, match="must be positive"):
        kernels.linear(d(y), d(x), d(w), 0, 0, 64, 64, "BF16", "BF16", stream)
    assert torch.isnan(y.float()).all()


@pytest.mark.parametrize("n", [4096, 51300])  # 8 warps splitting K; 1, with 4 weight tiles from 3 tokens
def test_gemv_deterministic_and_batch_invariant(kernels, stream, n):
    """The GEMV's summation order depends on n and k alone: the same bits on every run, and a token's row
    does not depend on the other tokens of the call (1 to 64 of them: 8 or 16 tokens per MMA, 2 or 4 weight
    tiles per row group, one or several 16-token blocks)."""
    k = 512
    x, w = rand(64, k), rand(n, k, scale=0.05)

    def run(m):
        y = poisoned(m, n, dtype=torch.float32)
        kernels.gemv(d(y), d(x), d(w), 0, m, n, k, kernels.BF16, stream, y_dtype=kernels.FP32)
        torch.cuda.synchronize()
        return y

    full = run(64)
    assert rel_err(full, x.double() @ w.double().T) <= 1e-5
    assert torch.equal(full, run(64))
    for m in (1, 3, 9, 17):
        assert torch.equal(run(m), full[:m]), f"{m} tokens"


def test_bad_arguments_are_refused(kernels, stream):
    x = rand(4, 64)
    out = poisoned(4, 64, dtype=torch.bfloat16)
    w = rand(64)
    bf16 = kernels.BF16
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.rms_norm(d(out), d(x), d(w), 4, 64, 48, 1e-6, bf16, stream)  # group does not divide the row
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.rms_norm(d(out), d(x), d(w), 4, 64, 64, 1e-6, kernels.FP32, stream)  # unsupported dtype
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.rms_norm(d(out), d(x) + 2, d(w), 4, 64, 64, 1e-6, bf16, stream)  # not 16-byte aligned
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.add(0, d(x), d(x), 256, bf16, stream)  # null output
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.gemv(d(out), d(x), d(w), 0, 65, 1, 64, bf16, stream)  # m above the limit
    assert not kernels.gemv_supported(1, 100) and not kernels.gemv_supported(65, 64)
    assert torch.isnan(out.float()).all()  # no refused launch wrote anything
