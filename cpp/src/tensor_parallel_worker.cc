// The tensor-parallel group behind the Worker seam (rtllm/worker.h): rank 0's TensorParallelWorker
// drives it, every other rank runs run_tensor_parallel_follower() until rank 0 stops the group.
//
// Each step rank 0 broadcasts one message, the step's block copies and StepInputs (plain int32 arrays),
// then runs its own shard of the step; the followers decode the message into buffers they reuse, and run
// the same block copies and forward. The graph's collectives (all_reduce, gather) meet inside the forward;
// only rank 0 samples. A follower that cannot run a step fails the same check rank 0 fails (they run the
// same inputs through the same code), so it goes on to the next message as rank 0 does. A collective
// that does not complete (a rank died, or is stuck) throws on rank 0 after the communicator's timeout:
// the group is lost, every later step fails with the first error, and shutdown() stops what is left.
#include <cstring>
#include <string>
#include <utility>

#include "rtllm/communicator.h"
#include "rtllm/worker.h"

namespace rtllm {

namespace {

enum class Message : int32_t { kStep = 1, kStop = 2, kSetup = 3 };

// Appends int32 values to a byte buffer whose capacity is kept from step to step.
class MessageWriter {
 public:
  explicit MessageWriter(std::vector<uint8_t>* out) : out_(out) { out_->clear(); }
  void value(int32_t v) { append(&v, 1); }
  void array(const std::vector<int32_t>& values) {
    value(static_cast<int32_t>(values.size()));
    append(values.data(), values.size());
  }

 private:
  void append(const int32_t* values, size_t n) {
    const size_t at = out_->size();
    out_->resize(at + n * sizeof(int32_t));
    if (n) std::memcpy(out_->data() + at, values, n * sizeof(int32_t));
  }
  std::vector<uint8_t>* out_;
};

// Reads what MessageWriter wrote; a truncated or inconsistent message throws (never reads past the end).
class MessageReader {
 public:
  explicit MessageReader(const std::vector<uint8_t>& in) : in_(in) {}
  int32_t value() {
    int32_t v;
    read(&v, 1);
    return v;
  }
  void array(std::vector<int32_t>* values) {
    const int32_t n = value();
    RTLLM_CHECK(n >= 0 && static_cast<size_t>(n) <= (in_.size() - at_) / sizeof(int32_t),
                "tensor-parallel step message: an array of ", n, " values overruns the message");
    values->resize(n);  // keeps its capacity: no allocation once the buffers have grown
    read(values->data(), n);
  }
  bool done() const { return at_ == in_.size(); }

 private:
  void read(int32_t* values, size_t n) {
    RTLLM_CHECK(in_.size() - at_ >= n * sizeof(int32_t), "tensor-parallel step message is truncated");
    if (n) std::memcpy(values, in_.data() + at_, n * sizeof(int32_t));
    at_ += n * sizeof(int32_t);
  }
  const std::vector<uint8_t>& in_;
  size_t at_ = 0;
};

void encode_step(const BlockCopies& copies, const StepInputs& in, std::vector<uint8_t>* out) {
  MessageWriter w(out);
  w.value(static_cast<int32_t>(Message::kStep));
  w.value(static_cast<int32_t>(copies.size()));
  for (const auto& [from, to] : copies) {
    w.value(from);
    w.value(to);
  }
  w.array(in.input_ids);
  w.array(in.num_new_tokens);
  w.array(in.num_cached_tokens);
  w.array(in.block_table);
  w.value(in.max_blocks_per_seq);
  w.array(in.logits_indices);
}

void encode_stop(std::vector<uint8_t>* out) { MessageWriter(out).value(static_cast<int32_t>(Message::kStop)); }

// Rank 0's RuntimeConfig as it asked for it (0 fields unresolved): every rank resolves it the same way and
// so plans the same limits; the KV pool, where memory decides, agrees on the least (all_reduce_min).
void encode_setup(const RuntimeConfig& c, std::vector<uint8_t>* out) {
  MessageWriter w(out);
  float fraction = c.kv_free_memory_fraction;
  int32_t fraction_bits;
  std::memcpy(&fraction_bits, &fraction, sizeof(fraction));
  for (int32_t v : {static_cast<int32_t>(Message::kSetup), static_cast<int32_t>(c.device), c.max_num_tokens,
                    c.max_batch_size, c.num_kv_blocks, c.tokens_per_block, c.num_threads,
                    static_cast<int32_t>(c.enable_cuda_graphs), fraction_bits, static_cast<int32_t>(c.device_sampling),
                    static_cast<int32_t>(c.kv_cache_dtype.has_value()),
                    static_cast<int32_t>(c.kv_cache_dtype.value_or(DataType::kFloat32)), c.max_num_logits})
    w.value(v);
}

// The follower's config: rank 0's, with this rank's communicator.
RuntimeConfig decode_setup(const std::vector<uint8_t>& bytes, std::shared_ptr<Communicator> communicator) {
  MessageReader r(bytes);
  RTLLM_CHECK(r.value() == static_cast<int32_t>(Message::kSetup), "tensor-parallel group: expected the setup message");
  RuntimeConfig c;
  c.device = static_cast<DeviceKind>(r.value());
  c.max_num_tokens = r.value();
  c.max_batch_size = r.value();
  c.num_kv_blocks = r.value();
  c.tokens_per_block = r.value();
  c.num_threads = r.value();
  c.enable_cuda_graphs = r.value() != 0;
  const int32_t fraction_bits = r.value();
  std::memcpy(&c.kv_free_memory_fraction, &fraction_bits, sizeof(fraction_bits));
  c.device_sampling = r.value() != 0;
  const bool has_kv_dtype = r.value() != 0;
  const auto kv_dtype = static_cast<DataType>(r.value());
  if (has_kv_dtype) c.kv_cache_dtype = kv_dtype;
  c.max_num_logits = r.value();
  RTLLM_CHECK(r.done(), "tensor-parallel setup message has trailing bytes");
  c.communicator = std::move(communicator);
  return c;
}

bool is_stop(const std::vector<uint8_t>& bytes) {
  int32_t kind = 0;
  if (bytes.size() >= sizeof(kind)) std::memcpy(&kind, bytes.data(), sizeof(kind));
  return kind == static_cast<int32_t>(Message::kStop);
}

// Returns the message's kind; for a step, fills copies and inputs.
Message decode(const std::vector<uint8_t>& bytes, BlockCopies* copies, StepInputs* in) {
  MessageReader r(bytes);
  const int32_t kind = r.value();
  if (kind == static_cast<int32_t>(Message::kStop)) return Message::kStop;
  RTLLM_CHECK(kind == static_cast<int32_t>(Message::kStep), "tensor-parallel message of unknown kind ", kind);
  const int32_t num_copies = r.value();
  RTLLM_CHECK(num_copies >= 0, "tensor-parallel step message: ", num_copies, " block copies");
  copies->resize(num_copies);
  for (auto& [from, to] : *copies) {
    from = r.value();
    to = r.value();
  }
  r.array(&in->input_ids);
  r.array(&in->num_new_tokens);
  r.array(&in->num_cached_tokens);
  r.array(&in->block_table);
  in->max_blocks_per_seq = r.value();
  r.array(&in->logits_indices);
  RTLLM_CHECK(r.done(), "tensor-parallel step message has trailing bytes");
  return Message::kStep;
}

Communicator& group_of(const RuntimeConfig& config, bool leader) {
  RTLLM_CHECK_ARG(config.communicator != nullptr, "a tensor-parallel worker needs RuntimeConfig.communicator");
  const int32_t rank = config.communicator->rank();
  RTLLM_CHECK_ARG(leader ? rank == 0 : rank != 0, leader ? "the tensor-parallel leader must be rank 0, not rank "
                                                         : "a tensor-parallel follower must not be rank 0, got rank ",
                  rank);
  return *config.communicator;
}

}  // namespace

struct TensorParallelWorker::Impl {
  std::shared_ptr<Communicator> communicator;
  LocalWorker local;         // this rank's shard: runs the copies, forward and draw
  std::vector<uint8_t> message;  // the step's broadcast, its capacity kept from step to step
  std::string lost;          // why the group is lost ("" while it works)
  bool stopped = false;
};

// The followers wait in run_tensor_parallel_follower for this setup; then every rank loads its runner.
TensorParallelWorker::TensorParallelWorker(std::shared_ptr<const Engine> engine, const RuntimeConfig& config) {
  Communicator& group = group_of(config, /*leader=*/true);
  std::vector<uint8_t> setup;
  encode_setup(config, &setup);
  group.broadcast(&setup, 0);
  try {
    impl_.reset(new Impl{config.communicator, LocalWorker(std::move(engine), config), std::move(setup), {}, false});
  } catch (...) {
    try {  // the followers would wait for steps that never come
      stop_tensor_parallel_followers(group);
    } catch (const std::exception&) {
    }
    throw;
  }
}

TensorParallelWorker::~TensorParallelWorker() { shutdown(); }

void TensorParallelWorker::execute_step(const WorkerStep& step, std::vector<SampledToken>* out) {
  Impl& s = *impl_;
  RTLLM_CHECK(s.lost.empty(), "the tensor-parallel group is lost: ", s.lost);
  RTLLM_CHECK(!s.stopped, "the worker is shut down; it cannot run a step");
  encode_step(step.block_copies, step.inputs, &s.message);
  try {
    s.communicator->broadcast(&s.message, 0);
    s.local.execute_step(step, out);
  } catch (const CommunicatorError& e) {
    s.lost = e.what();
    throw;
  }
}

void TensorParallelWorker::shutdown() noexcept {
  Impl& s = *impl_;
  if (s.stopped) return;
  s.stopped = true;
  if (s.lost.empty()) {
    try {  // the followers leave their loops; a lost group has nobody left to tell
      stop_tensor_parallel_followers(*s.communicator);
    } catch (const std::exception&) {
    }
  }
  s.local.shutdown();
}

std::shared_ptr<const Engine> TensorParallelWorker::engine() const { return impl_->local.engine(); }
const RuntimeConfig& TensorParallelWorker::config() const { return impl_->local.config(); }
int32_t TensorParallelWorker::vocab_size() const { return impl_->local.vocab_size(); }

// The disconnect after the stop: a broadcast's root may finish before anyone received it, the
// disconnect's barrier returns once every follower has (or throws for one that is gone, which marks the
// group lost and keeps MPI_Finalize from waiting for it at exit); then the processes are independent.
void stop_tensor_parallel_followers(Communicator& group) {
  std::vector<uint8_t> message;
  encode_stop(&message);
  group.broadcast(&message, 0);
  group.disconnect();
}

void run_tensor_parallel_follower(std::shared_ptr<const Engine> engine, const RuntimeConfig& config) {
  Communicator& group = group_of(config, /*leader=*/false);
  std::vector<uint8_t> message;
  group.broadcast_wait(&message, 0);  // rank 0 may still be loading its weights
  if (is_stop(message)) return group.disconnect();
  ModelRunner runner(std::move(engine), decode_setup(message, config.communicator));
  BlockCopies copies;
  StepInputs inputs;
  for (;;) {
    group.broadcast_wait(&message, 0);  // idle between requests: waits as long as rank 0 lives
    if (decode(message, &copies, &inputs) == Message::kStop) return group.disconnect();
    try {
      if (!copies.empty()) runner.copy_blocks(copies);
      runner.forward(inputs);
    } catch (const CommunicatorError&) {
      throw;  // the group is lost
    } catch (const Error&) {
      // rank 0 fails the same check on the same inputs, and goes on serving: so does this rank
    }
  }
}

}  // namespace rtllm
