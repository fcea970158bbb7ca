"""rtllm's float conversions (convert_floats: the engine's and the CPU ops' reference) against torch's
float8_e4m3fn / float8_e5m2 / bfloat16 / float16 casts, bit for bit."""
import numpy as np
import pytest
import torch

from rtllm import _core

FP8 = {"F8_E4M3": (torch.float8_e4m3fn, 448.0), "F8_E5M2": (torch.float8_e5m2, 57344.0)}


def convert(values, src, dst):
    raw = np.ascontiguousarray(values).view(np.uint8).ravel()
    return _core.convert_floats(raw, src, dst)


def fresh_floats(seed, n, limit):
    """Random magnitudes over every binade up to `limit`, both signs, plus exact halfway points of the
    fp8 grids (ties round to even)."""
    rng = np.random.default_rng(seed)
    mags = np.exp2(rng.uniform(-20, np.log2(limit), n))
    values = (mags * rng.choice([-1, 1], n)).astype(np.float32)
    return np.concatenate([values, np.float32([0.0, -0.0, 1.0625, 1.1875, 0.00146484375, 3.0 * 2 ** -10])])


@pytest.mark.parametrize("name", FP8)
def test_fp8_decode_every_code(name):
    torch_dtype, _ = FP8[name]
    codes = np.arange(256, dtype=np.uint8)
    ours = convert(codes, name, "F32").view(np.float32)
    theirs = torch.from_numpy(codes).view(torch_dtype).float().numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(theirs)
    assert np.array_equal(ours[finite], theirs[finite])


@pytest.mark.parametrize("name", FP8)
@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_encode_rounds_to_nearest_even(name, seed):
    torch_dtype, max_finite = FP8[name]
    values = fresh_floats(seed, 20000, max_finite)
    ours = convert(values, "F32", name)
    theirs = torch.from_numpy(values).to(torch_dtype).view(torch.uint8).numpy()
    assert np.array_equal(ours, theirs), np.flatnonzero(ours != theirs)[:10]


@pytest.mark.parametrize("name", FP8)
def test_fp8_encode_saturates_finite_and_keeps_nan(name):
    _, max_finite = FP8[name]
    values = np.float32([max_finite * 1.5, -1e30, np.inf, -np.inf, np.nan])
    back = convert(convert(values, "F32", name), name, "F32").view(np.float32)
    assert list(back[:4]) == [max_finite, -max_finite, max_finite, -max_finite]
    assert np.isnan(back[4])


@pytest.mark.parametrize("src,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_dtypes_round_trip_like_torch(src, torch_dtype):
    values = fresh_floats(5, 5000, 60000.0)
    ours = convert(values, "F32", src).view(np.uint16)
    theirs = torch.from_numpy(values).to(torch_dtype).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    # bf16 -> fp8 goes through the exact widening: the same bits as rounding the float32 value.
    direct = convert(values, "F32", "F8_E4M3")
    via_half = convert(torch.from_numpy(values).to(torch_dtype).float().numpy(), "F32", "F8_E4M3")
    assert np.array_equal(convert(ours.view(np.uint8), src, "F8_E4M3"), via_half)
    assert direct.shape == via_half.shape


def test_integer_dtypes_do_not_convert():
    with pytest.raises(ValueError, match="cannot convert I32 to F32"):
        convert(np.int32([1, 2]), "int32", "float32")
