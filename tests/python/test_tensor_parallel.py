"""Tensor parallelism end to end on the CPU: LLM(tensor_parallel_size=2) against the same checkpoint on one
rank (greedy tokens equal, every architecture), the engine files of a sharded build, an `mpirun -n 2`
launch, a follower killed mid-generation, and the refusals.

The ranks' partial sums are added in another order than one rank's dot products, so logits differ by
float32 rounding (~1e-6 relative on these models); greedy tokens are equal unless two candidates are that
close, which the seeds here avoid (the comparison is exact, not a tolerance on tokens).
"""
import collections
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from rtllm import LLM, QuantAlgo, QuantConfig, SamplingParams, _core
from rtllm.builder import BuildConfig, build, build_and_save
from rtllm.builder.safetensors_io import SafetensorsFile
from rtllm.mapping import Mapping
from rtllm.models import AutoModelForCausalLM
from tensor_parallel_helpers import check_a_killed_follower_fails_the_requests, follower_pids

pytestmark = pytest.mark.skipif(not _core.mpi_available() or shutil.which("mpirun") is None,
                                reason="rtllm was built without MPI" if not _core.mpi_available()
                                else "mpirun is not installed (Debian: openmpi-bin)")

PROMPTS = [[5, 17, 42, 7, 99, 3, 64], [11, 250, 8], [77, 31, 2, 190, 6, 140, 21, 9, 33]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
LIMITS = dict(max_seq_len=128, max_batch_size=4)

# (arch, dtype, tied embeddings, config overrides): qwen2 has q/k/v biases, qwen3 q/k norms, granite its
# multipliers folded into the weights; num_key_value_heads=1 is MQA (the KV head replicated on both ranks).
VARIANTS = [
    ("llama", "float32", False, {}),
    ("llama", "bfloat16", True, {}),
    ("llama3", "float32", False, {}),
    ("mistral", "float32", False, {}),
    ("qwen2", "float32", False, {}),
    ("qwen3", "float32", True, {}),
    ("granite", "float32", True, {}),
    ("llama", "float32", False, {"num_key_value_heads": 1}),
]


def greedy_tokens(llm):
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("arch,dtype,tie,overrides", VARIANTS,
                         ids=[f"{a}-{d}-{'tied' if t else 'untied'}{'-mqa' if o else ''}" for a, d, t, o in VARIANTS])
def test_two_ranks_give_the_tokens_of_one(tiny_model, arch, dtype, tie, overrides):
    checkpoint = str(tiny_model(arch, dtype, tie, **overrides))
    with LLM(checkpoint, **LIMITS) as llm:
        expected = greedy_tokens(llm)
    with LLM(checkpoint, tensor_parallel_size=2, **LIMITS) as llm:
        assert llm.tensor_parallel_size == 2
        assert greedy_tokens(llm) == expected


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_vocabulary_that_does_not_split_is_padded(tmp_path, tie):
    """A vocabulary of 301 ids on two ranks: each holds 151 rows (the last rank one row of zeros past the
    vocabulary), and rank 0 drops the padding column after the gather: the logits and tokens are one
    rank's."""
    from checkpoints import make_hf_checkpoint
    from hf_reference import BOS_ID, EOS_ID

    make_hf_checkpoint(tmp_path, arch="llama", tie_word_embeddings=tie, vocab_size=301, bos_token_id=BOS_ID,
                       eos_token_id=EOS_ID)
    with LLM(str(tmp_path), skip_tokenizer_init=True, **LIMITS) as llm:
        expected = greedy_tokens(llm)
    with LLM(str(tmp_path), skip_tokenizer_init=True, tensor_parallel_size=2, **LIMITS) as llm:
        assert greedy_tokens(llm) == expected
    rank0 = AutoModelForCausalLM.from_hugging_face(str(tmp_path), mapping=Mapping(2, 2, 0))
    assert rank0.model.embed_tokens.weight.shape[0] == 151 and rank0.lm_head.weight.shape[0] == 151
    last = AutoModelForCausalLM.from_hugging_face(str(tmp_path), mapping=Mapping(2, 2, 1)).model.embed_tokens
    assert not last.weight.load()[-1].any()  # the padding row


def test_group_quantized_weights_split_whole(tiny_model):
    """W4A16's groups run along the input features, and each rank's half of a row-parallel weight holds whole
    groups (64 / 2 is a multiple of 32): the two ranks' codes and scales are one rank's, split, and so are
    the tokens."""
    checkpoint = str(tiny_model("llama"))
    quant = QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=32)
    with LLM(checkpoint, quant_config=quant, **LIMITS) as llm:
        expected = greedy_tokens(llm)
    with LLM(checkpoint, tensor_parallel_size=2, quant_config=quant, **LIMITS) as llm:
        assert greedy_tokens(llm) == expected


_USE_AND_EXIT = """
import sys
from rtllm import LLM, SamplingParams
with LLM(sys.argv[1], tensor_parallel_size=2, max_seq_len=128, max_batch_size=4) as llm:
    print(llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False).outputs[0].token_ids)
"""


def test_a_process_that_ran_two_ranks_exits(tiny_model):
    """After shutdown the spawned ranks are disconnected: the process finalises MPI on its own at exit instead
    of waiting for followers that have gone."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _USE_AND_EXIT, str(tiny_model("llama"))], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("["), done.stdout
    assert time.monotonic() - start < 60
    assert follower_pids() == []


def build_one_and_two(checkpoint, path, quant=None) -> tuple:
    """The engine files of `checkpoint` built for one rank and for two: (one, [rank0, rank1])."""
    def load(mapping):
        return AutoModelForCausalLM.from_hugging_face(checkpoint, mapping=mapping)

    build_and_save(load, path / "one", BuildConfig(**LIMITS), quant)
    build_and_save(load, path / "two", BuildConfig(**LIMITS), quant, tp_size=2)
    return (SafetensorsFile(str(path / "one" / "rank0.engine")),
            [SafetensorsFile(str(path / "two" / f"rank{r}.engine")) for r in range(2)])


def assert_split(name: str, full: np.ndarray, parts: list) -> None:
    """parts are the two ranks' shards of the one-rank tensor `full` (tiny_model's llama: 4 heads, 2 KV heads
    of 16), by the sharding of the weight they belong to (codes and per-row scales split as their weight)."""
    row_parallel = ".o_proj." in name or ".down_proj." in name
    if name.endswith(("norm.weight", "inv_freq", "input_scale")) or full.shape == (1,) or \
            (row_parallel and (full.ndim == 1 or full.shape[1] == 1)):  # (per-output-channel scales)
        for part in parts:  # whole on every rank
            np.testing.assert_array_equal(part, full, err_msg=name)
    elif row_parallel:  # input features split
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), full, err_msg=name)
    elif ".qkv_proj." in name:  # each rank: its q heads, then its k and v heads
        q, kv = 32, 16  # rows of q and of k (or v) on one rank
        for part_rows in ((0, q), (q, q + kv), (q + kv, q + 2 * kv)):
            pieces = [p[slice(*part_rows)] for p in parts]
            start = part_rows[0] * 2
            np.testing.assert_array_equal(np.concatenate(pieces), full[start:start + 2 * (part_rows[1] - part_rows[0])],
                                          err_msg=name)
    elif ".gate_up_proj." in name:  # gate rows then up rows on each rank
        halves = [np.split(p, 2) for p in parts]
        np.testing.assert_array_equal(np.concatenate([h[0] for h in halves] + [h[1] for h in halves]), full,
                                      err_msg=name)
    else:  # the embedding and the LM head: vocabulary rows split
        np.testing.assert_array_equal(np.concatenate(parts), full, err_msg=name)


def test_rank_files_hold_their_shards(tiny_model, tmp_path):
    """Each rank's file holds 1/2 of every split weight (and whole copies of the norms and the RoPE table);
    the shards put back together are the one-rank engine's weights."""
    one, ranks = build_one_and_two(str(tiny_model("llama")), tmp_path)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["mapping"] == {"world_size": 2, "tp_size": 2}
    assert sorted(one.keys()) == sorted(ranks[0].keys()) == sorted(ranks[1].keys())
    whole_bytes = shard_bytes = 0
    for name in one.keys():
        full, parts = one.get(name), [r.get(name) for r in ranks]
        whole_bytes += full.nbytes
        shard_bytes += parts[0].nbytes
        assert_split(name, full, parts)
    norms = sum(one.get(n).nbytes for n in one.keys() if n.endswith(("norm.weight", "inv_freq")))
    assert shard_bytes == (whole_bytes - norms) // 2 + norms


def test_row_parallel_all_reduces_fuse_with_the_next_norm(tiny_model, tmp_path):
    """Each row-parallel output's all-reduce (o_proj, down_proj) becomes one all_reduce_add_rms_norm with the
    residual add and norm after it, where the one-rank graph has an add_rms_norm; the embedding's all-reduce
    (a plain rms_norm follows) stays. Token equality with one rank is test_two_ranks_give_the_tokens_of_one."""
    build_one_and_two(str(tiny_model("llama")), tmp_path)
    ops = [collections.Counter(n["op"] for n in json.loads((tmp_path / d / "config.json").read_text())["graph"]["nodes"])
           for d in ("one", "two")]
    num_layers = 2
    assert ops[0]["add_rms_norm"] == 2 * num_layers and ops[0]["all_reduce"] == 0
    assert ops[1]["all_reduce_add_rms_norm"] == 2 * num_layers and ops[1]["add_rms_norm"] == 0
    assert ops[1]["all_reduce"] == 1


# Calibrated quantization: build_and_save runs the whole model over the calibration data once, and every
# rank quantizes its shard with what it saw (per-channel statistics of a row-parallel input cut to the rank's
# channels).
CALIB = dict(calib_size=8, calib_max_seq_length=64)
FP8_STATIC = QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8, **CALIB)


@pytest.mark.parametrize("quant", [FP8_STATIC, QuantConfig(kv_cache_quant_algo=QuantAlgo.INT8, **CALIB)],
                         ids=["fp8-static-fp8-kv", "int8-kv"])
def test_calibrated_quantization_gives_the_tokens_of_one_rank(tiny_model, quant):
    checkpoint = str(tiny_model("llama"))
    with LLM(checkpoint, quant_config=quant, **LIMITS) as llm:
        expected = greedy_tokens(llm)
    with LLM(checkpoint, tensor_parallel_size=2, quant_config=quant, **LIMITS) as llm:
        assert greedy_tokens(llm) == expected


def test_fp8_static_shards_are_the_whole_model_quantized(tiny_model, tmp_path):
    """Static FP8 on two ranks: each rank's E4M3 codes are one rank's, split, because its per-tensor weight
    scale is that of the whole weight and its input scale that of the whole model's activations; the K/V
    scales are one rank's too."""
    one, ranks = build_one_and_two(str(tiny_model("llama")), tmp_path, FP8_STATIC)
    assert sorted(one.keys()) == sorted(ranks[0].keys())
    scales = [n for n in one.keys() if n.endswith(("weight_scale", "input_scale"))]
    assert len(scales) == 2 * 4 * 2  # 2 layers x 4 linears x (weight, input)
    for name in one.keys():
        assert_split(name, one.get(name), [r.get(name) for r in ranks])
    configs = [json.loads((tmp_path / d / "config.json").read_text())["graph"]["nodes"] for d in ("one", "two")]
    kv = [[(n["attrs"]["k_scale"], n["attrs"]["v_scale"]) for n in c if n["op"] == "attention"] for c in configs]
    assert kv[0] == kv[1] and len(kv[0]) == 2


def test_gptq_column_parallel_shards_are_one_ranks_rows(tiny_model, tmp_path):
    """GPTQ quantizes each output row on its own given its input's Hessian, which comes from the whole model:
    the column-parallel linears' codes and scales on each rank are one rank's rows. (A row-parallel shard
    sees only its channels' block of the Hessian, so its codes may differ from one rank's.) Two ranks then
    generate."""
    checkpoint = str(tiny_model("llama"))
    quant = QuantConfig(quant_algo=QuantAlgo.W4A16_GPTQ, group_size=32, **CALIB)
    one, ranks = build_one_and_two(checkpoint, tmp_path, quant)
    column_parallel = [n for n in one.keys() if ".qkv_proj." in n or ".gate_up_proj." in n]
    assert len(column_parallel) == 2 * 2 * 2  # 2 layers x 2 linears x (codes, scales)
    for name in column_parallel:
        assert_split(name, one.get(name), [r.get(name) for r in ranks])
    with LLM(str(tmp_path / "two"), tensor_parallel_size=2) as llm:
        assert [len(t) for t in greedy_tokens(llm)] == [16] * len(PROMPTS)


@pytest.mark.parametrize("algo", [QuantAlgo.W4A16_AWQ, QuantAlgo.W8A8_SQ_PER_CHANNEL])
def test_awq_and_smoothquant_build_and_run_on_two_ranks(tiny_model, algo):
    """Each rank searches (AWQ) or balances (SmoothQuant) its own shard against the whole model's statistics:
    its scales fold into its own copy of the norm and producer rows, so the engine runs; its codes may differ
    from one rank's."""
    quant = QuantConfig(quant_algo=algo, group_size=32, **CALIB) if algo == QuantAlgo.W4A16_AWQ else \
        QuantConfig(quant_algo=algo, **CALIB)
    with LLM(str(tiny_model("llama")), tensor_parallel_size=2, quant_config=quant, **LIMITS) as llm:
        assert [len(t) for t in greedy_tokens(llm)] == [16] * len(PROMPTS)


@pytest.mark.parametrize("layout, weights, acts", [("compressed-tensors", "tensor", "tensor"),
                                                   ("modelopt", "channel", "token")])
def test_prequantized_fp8_checkpoint_splits(tiny_model, tmp_path, layout, weights, acts):
    """A pre-quantized FP8 checkpoint on two ranks: each rank holds its slice of the checkpoint's codes (the
    fused parts' per-tensor scales unified over the whole parts first) and of its per-channel scales, and the
    whole per-tensor, input and K/V scales. With static activations the tokens are one rank's; with per-token
    ones a row-parallel rank scales its slice of each token, and the tokens may differ."""
    from test_prequantized import write_prequantized

    checkpoint = tmp_path / "fp8"
    write_prequantized(str(tiny_model("llama")), str(checkpoint), layout, weights, acts, kv=True)
    one, ranks = build_one_and_two(str(checkpoint), tmp_path)
    assert sorted(one.keys()) == sorted(ranks[0].keys())
    assert sum(n.endswith("weight_scale") for n in one.keys()) == 8
    for name in one.keys():
        assert_split(name, one.get(name), [r.get(name) for r in ranks])
    if acts == "tensor":
        with LLM(str(tmp_path / "one")) as llm:
            expected = greedy_tokens(llm)
        with LLM(str(tmp_path / "two"), tensor_parallel_size=2) as llm:
            assert greedy_tokens(llm) == expected


@pytest.mark.parametrize("method, bits, group, sym, fmt", [("awq", 4, 32, False, None), ("gptq", 4, 32, True, None),
                                                          ("gptq", 8, -1, False, "gptq_v2")],
                         ids=["awq-g32", "gptq4-g32", "gptq8-per-channel"])
def test_prequantized_integer_checkpoint_splits(tiny_model, tmp_path, method, bits, group, sym, fmt):
    """AutoAWQ / GPTQ checkpoints on two ranks: each rank's codes, scales and offsets are one rank's, split
    (a row-parallel rank holds whole groups of its inputs; per channel, every rank the row's scale), so the
    tokens are one rank's."""
    from test_gptq_awq_checkpoints import write_checkpoint

    checkpoint = tmp_path / "ckpt"
    write_checkpoint(str(tiny_model("llama")), str(checkpoint), method, bits, group, sym, fmt)
    one, ranks = build_one_and_two(str(checkpoint), tmp_path)
    assert sorted(one.keys()) == sorted(ranks[0].keys())
    for name in one.keys():
        assert_split(name, one.get(name), [r.get(name) for r in ranks])
    with LLM(str(tmp_path / "one")) as llm:
        expected = greedy_tokens(llm)
    with LLM(str(tmp_path / "two"), tensor_parallel_size=2) as llm:
        assert greedy_tokens(llm) == expected


def test_calibration_for_a_rank_cuts_row_parallel_statistics(tiny_model):
    """Calibration.for_rank: the per-channel statistics of o_proj / down_proj (row-parallel) are the rank's
    slice of the whole model's; those of qkv / gate_up (column-parallel, whole input) are kept; linears that
    read one input keep sharing one InputStats."""
    from rtllm.builder.build import trace
    from rtllm.mapping import Mapping
    from rtllm.quantization.calibration import Calibration, InputStats

    checkpoint = str(tiny_model("llama"))
    rng = np.random.default_rng(0)
    whole = trace(AutoModelForCausalLM.from_hugging_face(checkpoint))
    stats, channel_amax = {}, {}
    for node in whole.nodes:
        if node.op == "linear":
            k = whole.shape_of(node.inputs[1])[1]
            x = rng.normal(size=(5, k))
            stats[node.inputs[1]] = InputStats(5, np.abs(x).sum(axis=0), x.T @ x)
            channel_amax[node.inputs[1]] = np.abs(x).max(axis=0).astype(np.float32)
    calibration = Calibration(1, 5, {}, [], channel_amax, stats)
    for rank in range(2):
        mapping = Mapping(2, 2, rank)
        network = trace(AutoModelForCausalLM.from_hugging_face(checkpoint, mapping=mapping))
        mine = calibration.for_rank(network, mapping)
        for name, st in stats.items():
            if ".o_proj." in name or ".down_proj." in name:
                half = slice(rank * st.xtx.shape[0] // 2, (rank + 1) * st.xtx.shape[0] // 2)
                np.testing.assert_array_equal(mine.input_stats[name].xtx, st.xtx[half, half])
                np.testing.assert_array_equal(mine.input_stats[name].abs_sum, st.abs_sum[half])
                np.testing.assert_array_equal(mine.channel_amax[name], channel_amax[name][half])
            else:
                assert mine.input_stats[name] is st
                assert mine.channel_amax[name] is channel_amax[name]


def test_a_killed_follower_fails_the_requests_and_the_parent_lives_on(tiny_model):
    llm = LLM(str(tiny_model("llama")), tensor_parallel_size=2, max_seq_len=512, max_batch_size=4)
    check_a_killed_follower_fails_the_requests(llm, r"rank 1 \(process \d+\) has exited; the group of 2 ranks is lost")


def test_mpirun_launch_serves_on_rank_0(tiny_model, tmp_path):
    """`mpirun -n 2 python app.py`: both processes run the application; rank 0's LLM serves it, rank 1's
    LLM(...) call becomes the follower and ends its process."""
    checkpoint = str(tiny_model("qwen2"))
    app = tmp_path / "app.py"
    app.write_text(
        "import json, sys\n"
        "from rtllm import LLM, SamplingParams\n"
        f"llm = LLM({checkpoint!r}, tensor_parallel_size=2, max_seq_len=128, max_batch_size=4)\n"
        "out = llm.generate(json.loads(sys.argv[1]), SamplingParams(max_tokens=16, temperature=0.0, "
        "ignore_eos=True), use_tqdm=False)\n"
        "print('tokens', json.dumps([list(o.outputs[0].token_ids) for o in out]), flush=True)\n"
        "llm.shutdown()\n")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    result = subprocess.run([shutil.which("mpirun"), "--oversubscribe", "-n", "2", sys.executable, str(app),
                             json.dumps(PROMPTS)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("tokens ")]
    assert len(lines) == 1, result.stdout  # rank 1 never reached the application's generate
    with LLM(checkpoint, **LIMITS) as llm:
        assert json.loads(lines[0][len("tokens "):]) == greedy_tokens(llm)


def test_refusals(tiny_model, tmp_path):
    checkpoint = str(tiny_model("llama"))
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match=f"tensor_parallel_size={bad!r} must be an int >= 1"):
            LLM(checkpoint, tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 runs on the CPU only for now"):
        LLM(checkpoint, tensor_parallel_size=2, device="cuda")
    build_and_save(lambda m: AutoModelForCausalLM.from_hugging_face(checkpoint, mapping=m), tmp_path / "two",
                   BuildConfig(**LIMITS), tp_size=2)
    with pytest.raises(ValueError, match="built for tp_size=2, not tensor_parallel_size=1"):
        LLM(str(tmp_path / "two"))
    with pytest.raises(ValueError, match="does not split into 3 equal pieces"):
        LLM(checkpoint, tensor_parallel_size=3, **LIMITS)
    from test_gptq_awq_checkpoints import write_checkpoint

    from test_gptq_awq_checkpoints import act_order

    write_checkpoint(checkpoint, str(tmp_path / "act-order"), "gptq", g_idx=act_order)
    with pytest.raises(ValueError, match=r"o_proj: an act-order \(desc_act\) g_idx spreads each group over every "
                                         r"rank's inputs of a row-parallel linear"):
        LLM(str(tmp_path / "act-order"), tensor_parallel_size=2, **LIMITS)
    rank_model = AutoModelForCausalLM.from_hugging_face(checkpoint, mapping=Mapping(2, 2, 0))
    with pytest.raises(ValueError, match="calibrates on the whole model, which one rank .* does not hold"):
        build(rank_model, BuildConfig(**LIMITS), FP8_STATIC)  # build_and_save calibrates it first
    assert follower_pids() == []  # the refused group's followers ended
