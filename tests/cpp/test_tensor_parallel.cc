// The tensor-parallel ops on one rank of two, over a recording Communicator that stands in for the other
// rank (no MPI): a vocab-parallel embedding gives this rank's rows of the vocabulary and zero rows for the
// other rank's ids, all_reduce hands the whole activation to the communicator, and gather puts the
// root's shards side by side in rank order. The graph: embedding -> all_reduce -> gather_rows -> linear
// (this rank's rows of the LM head) -> gather.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "rtllm/communicator.h"
#include "rtllm/engine.h"
#include "rtllm/model_runner.h"

namespace rtllm {
namespace {

constexpr int64_t kVShard = 3, kH = 4, kTp = 2;

// Rank `rank` of two. all_reduce_sum leaves the values (the other rank contributes zeros); gather fills
// the other rank's block with 1000 + its index, so that the test sees where each block lands.
class FakeCommunicator final : public Communicator {
 public:
  explicit FakeCommunicator(int32_t rank) : rank_(rank) {}
  int32_t rank() const override { return rank_; }
  int32_t size() const override { return kTp; }
  void all_reduce_sum(float*, int64_t count) override { reduced_counts.push_back(count); }
  void gather(const float* send, float* recv, int64_t count, int32_t root) override {
    gathered_counts.push_back(count);
    if (rank_ != root) return;
    for (int32_t r = 0; r < kTp; ++r)
      for (int64_t i = 0; i < count; ++i) recv[r * count + i] = r == rank_ ? send[i] : 1000.0f + i;
  }
  void broadcast(std::vector<uint8_t>*, int32_t) override {}
  void broadcast_wait(std::vector<uint8_t>*, int32_t) override {}
  int64_t all_reduce_min(int64_t value) override { return value; }
  void set_timeout(std::chrono::milliseconds) override {}
  std::chrono::milliseconds timeout() const override { return std::chrono::milliseconds(1000); }
  void barrier() override {}
  void disconnect() override {}

  std::vector<int64_t> reduced_counts, gathered_counts;

 private:
  int32_t rank_;
};

std::string config_json(int32_t root) {
  const std::string V = std::to_string(kVShard * kTp), Vs = std::to_string(kVShard), H = std::to_string(kH);
  return R"({"format_version": 2, "architecture": "LlamaForCausalLM",
    "model_config": {"architecture": "LlamaForCausalLM", "vocab_size": )" + V + R"(, "hidden_size": )" + H +
         R"(, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": )" + H + R"(},
    "build_config": {"max_batch_size": 2, "max_input_len": 8, "max_seq_len": 8, "max_num_tokens": 8},
    "mapping": {"world_size": 2, "tp_size": 2},
    "graph": {
      "inputs": [{"name": "input_ids", "dtype": "int32", "shape": ["num_tokens"]},
                 {"name": "positions", "dtype": "int32", "shape": ["num_tokens"]},
                 {"name": "logits_indices", "dtype": "int32", "shape": ["num_logits"]}],
      "outputs": [{"name": "logits", "dtype": "float32", "shape": ["num_logits", )" + V + R"(]}],
      "tensors": [{"name": "e", "shape": ["num_tokens", )" + H + R"(]},
                  {"name": "h", "shape": ["num_tokens", )" + H + R"(]},
                  {"name": "last", "shape": ["num_logits", )" + H + R"(]},
                  {"name": "part", "shape": ["num_logits", )" + Vs + R"(]}],
      "nodes": [
        {"op": "embedding", "inputs": ["input_ids", "embed"], "outputs": ["e"], "attrs": {"vocab_parallel": true}},
        {"op": "all_reduce", "inputs": ["e"], "outputs": ["h"]},
        {"op": "gather_rows", "inputs": ["h", "logits_indices"], "outputs": ["last"]},
        {"op": "linear", "inputs": ["last", "lm_head"], "outputs": ["part"]},
        {"op": "gather", "inputs": ["part"], "outputs": ["logits"], "attrs": {"root": )" + std::to_string(root) +
         R"(}}]}})";
}

struct Shards {
  std::vector<float> table, lm_head;  // this rank's rows, [kVShard, kH] each
};

std::shared_ptr<const Engine> make_engine(int32_t rank, int32_t root, const Shards& s) {
  std::vector<Weight> weights(2);
  weights[0] = Weight{"embed", DataType::kFloat32, {kVShard, kH}, s.table.data(), s.table.size() * sizeof(float)};
  weights[1] = Weight{"lm_head", DataType::kFloat32, {kVShard, kH}, s.lm_head.data(), s.lm_head.size() * sizeof(float)};
  return Engine::from_memory(config_json(root), std::move(weights), nullptr, rank);
}

class TensorParallelTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(TensorParallelTest, VocabParallelEmbeddingAllReduceAndGather) {
  const int32_t rank = GetParam(), root = rank;  // the root is this rank, so that its logits are written
  std::mt19937 gen(17 + rank);
  std::normal_distribution<float> normal;
  Shards s;
  for (int64_t i = 0; i < kVShard * kH; ++i) s.table.push_back(normal(gen)), s.lm_head.push_back(normal(gen));
  auto engine = make_engine(rank, root, s);
  ASSERT_EQ(engine->tp_size(), kTp);
  ASSERT_EQ(engine->rank(), rank);
  auto comm = std::make_shared<FakeCommunicator>(rank);
  RuntimeConfig config;
  config.num_kv_blocks = 2;
  config.tokens_per_block = 8;
  config.num_threads = 2;
  config.max_num_logits = 6;
  config.communicator = comm;
  ModelRunner runner(engine, config);

  StepInputs in;
  in.input_ids = {0, 5, 2, 3, 4, 1};  // both ranks' ids, the edges of each slice included
  in.num_new_tokens = {6};
  in.num_cached_tokens = {0};
  in.block_table = {0};
  in.max_blocks_per_seq = 1;
  in.logits_indices = {0, 1, 2, 3, 4, 5};
  const float* logits = runner.forward(in);

  const int64_t T = 6, V = kVShard * kTp;
  EXPECT_EQ(comm->reduced_counts, std::vector<int64_t>{T * kH});
  EXPECT_EQ(comm->gathered_counts, std::vector<int64_t>{T * kVShard});
  for (int64_t t = 0; t < T; ++t) {
    // This rank's part of the embedding: its own row, or zeros for the other rank's ids.
    const int64_t local = in.input_ids[t] - rank * kVShard;
    const bool own = local >= 0 && local < kVShard;
    for (int64_t r = 0; r < kTp; ++r)
      for (int64_t v = 0; v < kVShard; ++v) {
        double expected = 1000.0 + t * kVShard + v;  // the other rank's block, as the fake sent it
        if (r == rank) {
          expected = 0.0;
          for (int64_t k = 0; k < kH && own; ++k)
            expected += double(s.table[local * kH + k]) * s.lm_head[v * kH + k];
        }
        EXPECT_NEAR(logits[t * V + r * kVShard + v], expected, 1e-5) << "token " << t << " rank block " << r;
      }
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, TensorParallelTest, ::testing::Values(0, 1));

TEST(TensorParallel, RunnerChecksTheCommunicatorAgainstTheEngine) {
  Shards s{std::vector<float>(kVShard * kH, 1.0f), std::vector<float>(kVShard * kH, 1.0f)};
  RuntimeConfig config;
  config.num_kv_blocks = 2;
  config.tokens_per_block = 8;
  try {  // no communicator
    ModelRunner runner(make_engine(0, 0, s), config);
    FAIL() << "a tp_size 2 engine ran without a communicator";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tp_size 2"), std::string::npos) << e.what();
  }
  config.communicator = std::make_shared<FakeCommunicator>(1);
  try {  // engine rank 0 on communicator rank 1
    ModelRunner runner(make_engine(0, 0, s), config);
    FAIL() << "an engine for rank 0 ran on rank 1";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("loaded for rank 0 but this process is rank 1"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(Engine::from_memory(config_json(0), {}, nullptr, 2), InvalidArgument);  // rank >= tp_size
}

}  // namespace
}  // namespace rtllm
