"""The layer library's tensor-parallel loaders, checked by what sharding must preserve: a column linear's
per-rank outputs concatenate to the whole output, a row linear's per-rank partial outputs sum to it
(float64 numpy, no rtllm code in the reference)."""
import numpy as np
import pytest

import rtllm
from rtllm.builder.tensor import Parameter
from rtllm.mapping import Mapping
from rtllm.models import LlamaForCausalLM, ModelConfig
from rtllm.nn import ColumnLinear, Embedding, MergedColumnLinear, QKVColumnLinear, RowLinear, tp_shard

TP = 3


def checkpoint_tensor(name, array):
    """A lazy checkpoint tensor, as rtllm.models.checkpoint.Checkpoint.tensor returns."""
    return Parameter(array.shape, "float32", lambda: array.astype(np.float32), name)


def ranks(tp_size=TP):
    return [Mapping(world_size=tp_size, tp_size=tp_size, rank=r) for r in range(tp_size)]


def loaded(layer, weight, bias=None, shard_id=None):
    args = () if shard_id is None else (shard_id,)
    layer.weight.weight_loader(layer.weight, checkpoint_tensor("w", weight), *args)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, checkpoint_tensor("b", bias), *args)


class Float32Normal:
    """standard_normal values exactly representable in float32 (the checkpoint dtype), held as float64."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def standard_normal(self, shape):
        return self.rng.standard_normal(shape).astype(np.float32).astype(np.float64)


@pytest.fixture
def rng():
    return Float32Normal()


def test_column_linear_shards_outputs(rng):
    w, b, x = rng.standard_normal((12, 5)), rng.standard_normal(12), rng.standard_normal((4, 5))
    outputs = []
    for mapping in ranks():
        layer = ColumnLinear(5, 12, bias=True, mapping=mapping)
        assert layer.weight.shape == (4, 5)
        loaded(layer, w, b)
        outputs.append(x @ layer.weight.load().T + layer.bias.load())
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), x @ w.T + b, rtol=1e-12)


def test_row_linear_shards_inputs_and_adds_bias_once(rng):
    w, b, x = rng.standard_normal((5, 12)), rng.standard_normal(5), rng.standard_normal((4, 12))
    partial = []
    for mapping, x_part in zip(ranks(), np.split(x, TP, axis=1)):  # each rank sees its slice of the input
        layer = RowLinear(12, 5, bias=True, mapping=mapping)
        assert layer.weight.shape == (5, 4) and layer.bias.shape == (5,)
        loaded(layer, w, b)
        # every rank runs the same graph: rank 0 adds the bias, the others zeros
        np.testing.assert_array_equal(layer.bias.load(), b if mapping.tp_rank == 0 else np.zeros(5))
        partial.append(x_part @ layer.weight.load().T + layer.bias.load())
    np.testing.assert_allclose(sum(partial), x @ w.T + b, rtol=1e-12)  # the all-reduce's sum


def test_qkv_linear_gives_each_rank_its_heads(rng):
    hidden, nh, nkv, hd = 8, 6, 3, 2
    parts = {"q": rng.standard_normal((nh * hd, hidden)), "k": rng.standard_normal((nkv * hd, hidden)),
             "v": rng.standard_normal((nkv * hd, hidden))}
    x = rng.standard_normal((2, hidden))
    whole = {s: x @ w.T for s, w in parts.items()}  # [T, heads * hd]
    for mapping in ranks():
        layer = QKVColumnLinear(hidden, nh, nkv, hd, mapping=mapping)
        for shard_id, w in parts.items():
            loaded(layer, w, shard_id=shard_id)
        q, k, v = np.split(x @ layer.weight.load().T, [nh * hd // TP, (nh + nkv) * hd // TP], axis=1)
        r = mapping.tp_rank
        np.testing.assert_allclose(q, whole["q"][:, r * 4:(r + 1) * 4], rtol=1e-12)  # heads 2r, 2r + 1
        np.testing.assert_allclose(k, whole["k"][:, r * 2:(r + 1) * 2], rtol=1e-12)  # kv head r
        np.testing.assert_allclose(v, whole["v"][:, r * 2:(r + 1) * 2], rtol=1e-12)


@pytest.mark.parametrize("tp_size, nkv", [(2, 1), (4, 2), (4, 1)])
def test_qkv_linear_replicates_kv_heads_fewer_than_ranks(rng, tp_size, nkv):
    hidden, nh, hd = 8, 4, 2
    parts = {"q": rng.standard_normal((nh * hd, hidden)), "k": rng.standard_normal((nkv * hd, hidden)),
             "v": rng.standard_normal((nkv * hd, hidden))}
    x = rng.standard_normal((2, hidden))
    whole = {s: x @ w.T for s, w in parts.items()}
    q_heads = nh // tp_size
    for mapping in ranks(tp_size):
        layer = QKVColumnLinear(hidden, nh, nkv, hd, mapping=mapping)
        for shard_id, w in parts.items():
            loaded(layer, w, shard_id=shard_id)
        assert layer.weight.shape == ((q_heads + 2) * hd, hidden)  # one KV head per rank
        q, k, v = np.split(x @ layer.weight.load().T, [q_heads * hd, (q_heads + 1) * hd], axis=1)
        r = mapping.tp_rank
        kv_head = r * q_heads * nkv // nh  # the KV head this rank's query heads read (GQA groups)
        np.testing.assert_allclose(q, whole["q"][:, r * q_heads * hd:(r + 1) * q_heads * hd], rtol=1e-12)
        np.testing.assert_allclose(k, whole["k"][:, kv_head * hd:(kv_head + 1) * hd], rtol=1e-12)
        np.testing.assert_allclose(v, whole["v"][:, kv_head * hd:(kv_head + 1) * hd], rtol=1e-12)


def test_vocab_parallel_embedding_rows_sum_to_the_lookup(rng):
    """Each rank holds a slice of the vocabulary and gives zero rows outside it: the all-reduce's sum of the
    ranks' lookups is the whole table's."""
    table, ids = rng.standard_normal((12, 3)), np.array([0, 5, 11, 4, 8])
    total = np.zeros((len(ids), 3))
    for mapping in ranks():
        layer = Embedding(12, 3, mapping=mapping)
        assert layer.weight.shape == (4, 3)
        layer.weight.weight_loader(layer.weight, checkpoint_tensor("e", table))
        shard, start = layer.weight.load(), 4 * mapping.tp_rank
        local = ids - start
        inside = (local >= 0) & (local < 4)
        total += np.where(inside[:, None], shard[np.clip(local, 0, 3)], 0.0)
    np.testing.assert_array_equal(total, table[ids])


def test_merged_linear_stacks_parts_in_order(rng):
    gate, up = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    layer = MergedColumnLinear(3, [4, 4])
    loaded(layer, up, shard_id=1)  # the order of loading does not matter
    loaded(layer, gate, shard_id=0)
    np.testing.assert_array_equal(layer.weight.load(), np.concatenate([gate, up]))


def test_loader_refusals(rng):
    layer = MergedColumnLinear(3, [4, 4])
    loaded(layer, rng.standard_normal((4, 3)), shard_id=0)
    with pytest.raises(ValueError, match="lacks its parts \\[1\\]"):
        layer.weight.load()
    with pytest.raises(ValueError, match="unknown part 2; parts: \\[0, 1\\]"):
        loaded(layer, rng.standard_normal((4, 3)), shard_id=2)
    with pytest.raises(ValueError, match="tensor 'w' from the checkpoint has shape \\[5, 3\\], but config.json "
                                         "implies \\[4, 3\\]"):
        loaded(layer, rng.standard_normal((5, 3)), shard_id=0)
    with pytest.raises(ValueError, match="out_features=10 does not split into 3 equal pieces"):
        ColumnLinear(4, 10, mapping=ranks()[0])
    with pytest.raises(ValueError, match="cannot split 10 features \\(dim 1\\) into 3 pieces \\(tp_size=3\\)"):
        tp_shard(np.zeros((2, 10)), 1, ranks()[0])
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide tp_size=4 when it is smaller"):
        QKVColumnLinear(8, 4, 3, 2, mapping=ranks(4)[0])
    # a vocabulary that does not split is padded instead (zero rows up to a multiple of tp_size)
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    shards = []
    for mapping in ranks():
        emb = Embedding(10, 4, mapping=mapping)
        emb.weight_loader(emb.weight, Parameter((10, 4), "float32", lambda: table, "t"))
        assert emb.weight.shape == (4, 4)
        shards.append(emb.weight.load())
    np.testing.assert_array_equal(np.concatenate(shards), np.concatenate([table, np.zeros((2, 4), np.float32)]))
    with pytest.raises(ValueError, match=r"has shape \[12, 4\]"):  # the checkpoint holds the unpadded table
        emb.weight_loader(emb.weight, Parameter((12, 4), "float32", lambda: np.zeros((12, 4), np.float32), "t"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=0, tp_size=0), "world_size=0 must be a positive integer"),
    (dict(world_size=2, tp_size=2, rank=-1), "rank=-1 must be a non-negative integer"),
    (dict(world_size=2, tp_size=2, rank=2), "rank=2 must be less than world_size=2"),
    (dict(world_size=4, tp_size=2), "world_size=4 must equal tp_size=2"),
    (dict(tp_size=1.0), "tp_size=1.0 must be a positive integer"),
])
def test_bad_mapping(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mapping(**kwargs)


def test_model_shards_heads_and_vocabulary():
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=4, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=2, intermediate_size=4, max_position_embeddings=16,
                         rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None, tie_word_embeddings=True,
                         attention_bias=False, o_bias=False, qk_norm=False, dtype="float32", bos_token_id=-1,
                         eos_token_id=[])
    model = LlamaForCausalLM(config, rtllm.Mapping(world_size=2, tp_size=2, rank=1))
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (1, 1)  # the single KV head replicated on both ranks
    assert model.model.embed_tokens.weight.shape == (4, 4) and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].mlp.down_proj.weight.shape == (4, 2)
