"""attention_decode_qkv (decode attention with qkv_prepare's work folded in) against float64 references.

Each case draws a fresh random packed q|k|v row per sequence and a random pool of cached keys and values;
the new token's slot in the pool is poisoned with NaN, so a kernel that read it back instead of using
the key it prepared would produce NaN. Checked: the attention output (bounds of test_attention.py), the
new key (qk-norm + RoPE, bounds of test_kernels_basic.py) and value (copied exactly) in the pool, and that
nothing else in the pool changed. Split counts cover one split and the workspace merge of 5, 16 and 64
splits.
"""
import pytest
import torch

from test_attention import DTYPES, PagedCase, check_close, decode_workspace
from test_kernels_basic import TOL, inv_freq_for, prepare_ref, rel_err

CONTEXTS = [1, 2, 17, 100, 1000, 4097]


def run_decode_qkv(kernels, case, qkv, q_col, k_col, v_col, inv_freq, q_norm, k_norm, num_splits):
    d = case.to_device()
    out = torch.full((case.num_seqs, case.num_heads * case.head_dim), float("nan"), dtype=case.dtype,
                     device="cuda")
    kernels.attention_decode_qkv(
        out=out.data_ptr(), qkv=qkv.data_ptr(), qkv_row_stride=qkv.shape[1], q_col=q_col, k_col=k_col,
        v_col=v_col, inv_freq=inv_freq.data_ptr() if inv_freq is not None else 0,
        q_norm_weight=q_norm.data_ptr() if q_norm is not None else 0,
        k_norm_weight=k_norm.data_ptr() if k_norm is not None else 0, qk_norm_eps=1e-6,
        positions=d["positions"].data_ptr(), seq_len=d["seq_len"].data_ptr(), num_seqs=case.num_seqs,
        kv_data=d["pool"].data_ptr(), num_blocks=case.num_blocks, tokens_per_block=case.tpb,
        block_table=d["block_table"].data_ptr(), max_blocks_per_seq=case.max_blocks, num_heads=case.num_heads,
        num_kv_heads=case.num_kv_heads, head_dim=case.head_dim, scale=case.scale, num_splits=num_splits,
        workspace=decode_workspace(kernels, case, num_splits).data_ptr(), dtype=DTYPES[case.dtype],
        stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out, d["pool"].cpu()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim,heads", [(128, (32, 8)), (64, (8, 2)), (128, (16, 2)), (16, (4, 4)),
                                            (128, (40, 8))])  # GQA 4, 4, 8, 1 and 5
@pytest.mark.parametrize("num_splits", [1, 5, 16, 64])
@pytest.mark.parametrize("rope,qk_norm", [(True, False), (True, True), (False, False)])
def test_decode_qkv(kernels, dtype, head_dim, heads, num_splits, rope, qk_norm):
    check_decode_qkv(kernels, dtype, head_dim, heads, num_splits, rope, qk_norm)


# 80 and 96 run in the lanes of 128 with the rest idle; RoPE pairs dim d with d ± head_dim / 2.
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim,heads", [(80, (8, 2)), (96, (12, 4)), (80, (4, 4))])  # GQA 4, 3, 1
@pytest.mark.parametrize("num_splits", [1, 16])
@pytest.mark.parametrize("rope,qk_norm", [(True, False), (True, True), (False, False)])
def test_decode_qkv_head_dims_80_96(kernels, dtype, head_dim, heads, num_splits, rope, qk_norm):
    check_decode_qkv(kernels, dtype, head_dim, heads, num_splits, rope, qk_norm)


def check_decode_qkv(kernels, dtype, head_dim, heads, num_splits, rope, qk_norm):
    num_heads, num_kv_heads = heads
    seed = head_dim + num_heads + num_splits + 2 * rope + qk_norm
    gen = torch.Generator().manual_seed(seed)
    case = PagedCase([c - 1 for c in CONTEXTS], [1] * len(CONTEXTS), num_heads, num_kv_heads, head_dim, 16,
                     dtype=dtype, seed=seed)
    q_w, kv_w = num_heads * head_dim, num_kv_heads * head_dim
    # Columns v | q | k, and a row wider than the three: the kernel must follow the given offsets.
    v_col, q_col, k_col = 0, kv_w, kv_w + q_w
    qkv = (torch.randn(case.num_seqs, q_w + 2 * kv_w + 8, generator=gen) * 2.0).to(dtype)
    positions = torch.tensor(case.positions, dtype=torch.int32)
    inv_freq = inv_freq_for(head_dim, theta=500000.0) if rope else None
    q_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    k_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None

    q_ref = prepare_ref(qkv[:, q_col:q_col + q_w], num_heads, head_dim, q_norm, positions, inv_freq)
    k_ref = prepare_ref(qkv[:, k_col:k_col + kv_w], num_kv_heads, head_dim, k_norm, positions,
                        inv_freq).view(-1, num_kv_heads, head_dim)
    v_new = qkv[:, v_col:v_col + kv_w].view(-1, num_kv_heads, head_dim)

    # The new tokens' slots: poisoned in the pool the kernel gets, the reference's values in the reference.
    slots = [(int(case.block_table[s, p // case.tpb]), p % case.tpb) for s, p in enumerate(case.positions)]
    before = case.pool.clone()
    for b, i in slots:
        case.pool[b, :, :, i] = float("nan")
    out, pool = run_decode_qkv(kernels, case, qkv.cuda(), q_col, k_col, v_col, inv_freq, q_norm, k_norm,
                               num_splits)

    written = torch.zeros(case.num_blocks, case.tpb, dtype=torch.bool)
    for b, i in slots:
        written[b, i] = True
    k_got = torch.stack([pool[b, 0, :, i] for b, i in slots])
    v_got = torch.stack([pool[b, 1, :, i] for b, i in slots])
    assert rel_err(k_got, k_ref) <= TOL[dtype]
    assert torch.equal(v_got, v_new)
    untouched = ~written[:, None, None, :].expand(-1, 2, num_kv_heads, -1)
    assert torch.equal(pool[untouched], before[untouched])

    case.q = q_ref.to(dtype)  # the reference attends with the prepared q and the stored new keys
    for s, (b, i) in enumerate(slots):
        case.pool[b, 0, :, i] = k_got[s]
        case.pool[b, 1, :, i] = v_got[s]
    check_close(out, case.reference(), num_heads, head_dim)


def test_decode_qkv_refuses_bad_columns(kernels):
    case = PagedCase([3], [1], 8, 2, 128, 16)
    qkv = torch.randn(1, 12 * 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError):  # k columns run past the row
        run_decode_qkv(kernels, case, qkv, 0, 12 * 128 - 128, 8 * 128, None, None, None, 1)
    with pytest.raises(ValueError):  # a column offset that breaks 16-byte alignment
        run_decode_qkv(kernels, case, qkv, 4, 8 * 128, 10 * 128, None, None, None, 1)
