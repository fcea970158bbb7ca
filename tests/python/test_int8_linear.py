"""The CPU int8_linear op (W8A8_SQ_PER_CHANNEL) against a float64 numpy reference of the semantics in
docs/engine_format.md: per-token int8 activations (round half to even, ties included), exact integer
products, scales and bias applied after; zero rows; batches of 1 to 300 tokens; odd shapes; refusals at
load."""
import json
import shutil

import numpy as np
import pytest

from engine_fixture import RunnerSession, write_one_op_engine
from rtllm import RtllmError
from rtllm.builder.tensor import Parameter


def reference_codes(x: np.ndarray, pqs: np.ndarray | None):
    """The documented quantization, its float32 steps done in float32 (numpy's are IEEE, like the op's):
    xs = x · pqs, a_scale = amax |xs| / 127 (1 for zeros), qa = clamp(round_half_even(xs / a_scale))."""
    xs = x.astype(np.float32) if pqs is None else x.astype(np.float32) * pqs.astype(np.float32)
    amax = np.max(np.abs(xs), axis=1, keepdims=True)
    a_scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    ratio = (xs / a_scale).astype(np.float32)
    return np.clip(np.rint(ratio), -127, 127).astype(np.int64), a_scale[:, 0].astype(np.float64), ratio


def reference(x, codes, w_scale, pqs, bias):
    """float64 y = (Σ qa · w, exact) · a_scale · w_scale + bias, and the magnitude bounding its rounding."""
    qa, a_scale, _ = reference_codes(x, pqs)
    acc = qa @ codes.astype(np.int64).T  # exact
    scale = a_scale[:, None] * w_scale.astype(np.float64)[None, :]
    b = np.zeros(codes.shape[0]) if bias is None else bias.astype(np.float64)
    return acc * scale + b, np.abs(acc) * scale + np.abs(b)


def _engine(path, llama_dir, x, codes, w_scale, pqs, bias, **limits):
    N, K = codes.shape
    const = lambda a: (lambda: a)  # noqa: E731
    weights = {"w.weight": Parameter((N, K), "int8", const(codes.astype(np.int8)), "w.weight"),
               "w.weight_scale": Parameter((N, 1), "float32", const(w_scale.reshape(N, 1)), "w.weight_scale")}
    inputs = ["w.weight", "w.weight_scale"]
    if pqs is not None:
        weights["w.pre_quant_scale"] = Parameter((K,), "float32", const(pqs), "w.pre_quant_scale")
        inputs.append("w.pre_quant_scale")
    if bias is not None:
        weights["w.bias"] = Parameter((N,), "float32", const(bias), "w.bias")
        inputs.append("w.bias")
    write_one_op_engine(path, llama_dir, x, N, "int8_linear", inputs, weights,
                        {"has_pre_quant_scale": pqs is not None}, **limits)


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")


def _inputs(rng, K, N, pqs_kind, has_bias, num_rows):
    x = rng.normal(size=(num_rows, K)).astype(np.float32) * np.exp2(rng.uniform(-6, 6, size=(num_rows, 1)))
    x = x.astype(np.float32)
    x[0] = 0.0  # a row of zeros: a_scale 1, y = bias
    x[2] = 0.0
    x[2, K // 2] = -3.0  # one nonzero value: it maps to -127
    codes = rng.integers(-127, 128, size=(N, K)).astype(np.int8)
    w_scale = np.exp2(rng.uniform(-10, -2, size=N)).astype(np.float32)
    if pqs_kind == "pow2":
        pqs = np.exp2(rng.integers(-3, 4, size=K)).astype(np.float32)
    elif pqs_kind == "real":
        pqs = np.exp(rng.normal(size=K) * 0.7).astype(np.float32)
    else:
        pqs = None
    # row 1: ties. xs = [127, k + 0.5, ...] makes a_scale 1 exactly, so each k + 0.5 lies halfway between two
    # codes (x = xs / pqs, exact for powers of two; a real pqs makes them near-ties)
    xs = np.concatenate([[127.0], np.resize([2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -1.5, 126.5, -126.5], K - 1)])
    x[1] = (xs / (1.0 if pqs is None else pqs)).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32) if has_bias else None
    return x, codes, w_scale, pqs, bias


@pytest.mark.parametrize("K, N, pqs_kind, has_bias", [
    (64, 71, None, False),
    (128, 33, None, True),
    (37, 5, "real", True),     # K not a multiple of the 32-byte SIMD chunk: the scalar tail
    (96, 70, "pow2", False),
    (576, 129, "real", False),  # SmolLM2's hidden size
    (1, 3, None, True),
])
def test_cpu_int8_linear_against_float64(llama_dir, tmp_path, K, N, pqs_kind, has_bias):
    rng = np.random.default_rng(K * 1000 + N)
    # the one-op engine's vocabulary is its N outputs: N distinct activation rows, drawn with repetition
    x, codes, w_scale, pqs, bias = _inputs(rng, K, N, pqs_kind, has_bias, num_rows=N)
    if K > 1 and pqs_kind != "real":  # the tie row really has ties
        _, a_scale, ratio = reference_codes(x[1:2], pqs)
        assert a_scale[0] == 1.0 and np.any(np.abs(ratio - np.trunc(ratio)) == 0.5)
    _engine(tmp_path, llama_dir, x, codes, w_scale, pqs, bias, max_batch_size=320, max_num_tokens=320)
    expected, magnitude = reference(x, codes, w_scale, pqs, bias)
    session = RunnerSession(tmp_path, tokens_per_block=4, num_kv_blocks=512)
    seq, results = 0, {}
    for T in (1, 2, 17, 64, 300):
        tokens = [int(t) for t in rng.integers(0, N, T)]
        if T >= 17:
            tokens[:3] = [0, 1, 2]
        out = session.step({seq + i: [t] for i, t in enumerate(tokens)})
        got = np.stack([out[seq + i] for i in range(T)]).astype(np.float64)
        seq += T
        # float32: the int32 -> float conversion, two products and the bias add: 4 roundings of 2^-24
        tol = 4 * 2.0 ** -24 * magnitude[tokens]
        err = np.abs(got - expected[tokens])
        assert np.all(err <= tol), (T, np.max(err / np.maximum(magnitude[tokens], 1e-30)))
        for i, t in enumerate(tokens):
            results.setdefault(t, []).append(got[i])
    if 0 in results:  # x = 0: the bias (or 0) exactly
        np.testing.assert_array_equal(results[0][0], bias if has_bias else np.zeros(N))
    for rows in results.values():  # a token's row is bitwise the same in every batch
        for r in rows[1:]:
            np.testing.assert_array_equal(r, rows[0])


def test_one_rounding_flip_is_detected(llama_dir, tmp_path):
    """The tolerance above is tight enough that one activation code off by one (round half away from zero
    on the tie row instead of to even) fails it."""
    rng = np.random.default_rng(7)
    x, codes, w_scale, _, _ = _inputs(rng, 64, 40, None, False, num_rows=40)
    qa, a_scale, ratio = reference_codes(x[1:2], None)
    away = np.clip(np.sign(ratio) * np.floor(np.abs(ratio) + 0.5), -127, 127)
    assert np.any(away != qa)
    y_away = (away @ codes.astype(np.int64).T) * a_scale[:, None] * w_scale
    expected, magnitude = reference(x[1:2], codes, w_scale, None, None)
    assert np.any(np.abs(y_away - expected) > 4 * 2.0 ** -24 * magnitude)


def _edited(engine_dir, tmp_path, edit_config=None, edit_weights=None):
    shutil.copytree(engine_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    if edit_config:
        edit_config(next(n for n in config["graph"]["nodes"] if n["op"] == "int8_linear"), config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture(scope="module")
def op_engine(llama_dir, tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("int8_op")
    x, codes, w_scale, pqs, bias = _inputs(rng, 64, 24, "real", True, num_rows=16)
    _engine(path, llama_dir, x, codes, w_scale, pqs, bias)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda n, c: n["attrs"].update(has_pre_quant_scale=False),
     'op "int8_linear" takes 3..4 inputs, the node has 5'),
    (lambda n, c: n["inputs"].__setitem__(3, "w.bias"),
     'int8_linear: pre_quant_scale "w.bias" has shape \\[24\\], expected \\[64\\] \\(one scale per input channel\\)'),
    (lambda n, c: n["inputs"].__setitem__(2, "w.pre_quant_scale"),
     'int8_linear: weight_scale "w.pre_quant_scale" has shape \\[64\\], expected \\[24, 1\\]'),
    (lambda n, c: n["inputs"].__setitem__(1, "table"),
     'op "int8_linear" on the CPU backend does not support dtype F32 for input 1 \\("table"\\); supported: I8'),
    (lambda n, c: n["inputs"].__delitem__(slice(3, None)), 'op "int8_linear" takes 4..5 inputs, the node has 3'),
])
def test_malformed_node_is_refused_at_load(op_engine, tmp_path, edit, message):
    path = _edited(op_engine, tmp_path, edit)
    with pytest.raises(RtllmError, match=message):
        RunnerSession(path).step({0: [3]})


def test_code_minus_128_is_refused(llama_dir, tmp_path):
    rng = np.random.default_rng(2)
    x, codes, w_scale, _, _ = _inputs(rng, 64, 8, None, False, num_rows=8)
    codes[5, 9] = -128
    _engine(tmp_path, llama_dir, x, codes, w_scale, None, None)
    with pytest.raises(RtllmError, match='int8_linear: weight "w.weight" holds the code -128 at \\[5, 9\\]; '
                                         'int8_linear codes must lie in \\[-127, 127\\]'):
        RunnerSession(tmp_path).step({0: [3]})
