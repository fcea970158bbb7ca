// Engine::load: config.json -> ModelConfig, EngineLimits, Graph; rank{N}.engine -> mapped weights.
// Engine::from_memory: the same from config text and weights held by the caller.
#include "rtllm/engine.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "safetensors.h"

namespace rtllm {

struct Engine::Impl {
  std::string dir;
  Json config;
  ModelConfig model;
  EngineLimits limits;
  QuantSpec quant;
  int32_t tp_size = 1;
  int32_t rank = 0;
  Graph graph;
  std::vector<Weight> weights;                           // in file (or caller's) order
  std::shared_ptr<const void> storage;                   // owns the bytes weights point into
  std::unordered_map<std::string, size_t> weight_index;  // name -> index in weights
};

int64_t Weight::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(detail::concat("cannot read ", path, " (missing or unreadable)"));
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

int32_t to_int32(const Json& j, const char* key) {
  int64_t v = j.at(key).as_int();
  RTLLM_CHECK(v >= INT32_MIN && v <= INT32_MAX, key, " = ", v, " does not fit int32");
  return static_cast<int32_t>(v);
}

ModelConfig parse_model_config(const Json& j) {
  ModelConfig m;
  m.architecture = j.get_string("architecture", "");
  m.vocab_size = to_int32(j, "vocab_size");
  m.hidden_size = to_int32(j, "hidden_size");
  m.num_layers = to_int32(j, "num_layers");
  m.num_heads = to_int32(j, "num_heads");
  m.num_kv_heads = static_cast<int32_t>(j.get_int("num_kv_heads", m.num_heads));
  m.head_dim = static_cast<int32_t>(j.get_int("head_dim", m.num_heads > 0 ? m.hidden_size / m.num_heads : 0));
  m.intermediate_size = static_cast<int32_t>(j.get_int("intermediate_size", 0));
  m.max_position_embeddings = static_cast<int32_t>(j.get_int("max_position_embeddings", 0));
  m.dtype = parse_dtype(j.get_string("dtype", "float32"));
  m.bos_token_id = static_cast<int32_t>(j.get_int("bos_token_id", -1));
  if (j.contains("eos_token_id")) {
    const Json& eos = j.at("eos_token_id");
    if (eos.is_array()) {
      for (const Json& e : eos.as_array()) m.eos_token_ids.push_back(static_cast<int32_t>(e.as_int()));
    } else if (eos.is_number()) {
      m.eos_token_ids.push_back(static_cast<int32_t>(eos.as_int()));
    }
  }
  RTLLM_CHECK(m.vocab_size > 0 && m.hidden_size > 0 && m.num_layers > 0 && m.num_heads > 0 &&
                  m.num_kv_heads > 0 && m.head_dim > 0,
              "model_config sizes must be positive (vocab_size ", m.vocab_size, ", hidden_size ", m.hidden_size,
              ", num_layers ", m.num_layers, ", num_heads ", m.num_heads, ", num_kv_heads ", m.num_kv_heads,
              ", head_dim ", m.head_dim, ")");
  RTLLM_CHECK(m.num_heads % m.num_kv_heads == 0, "num_heads ", m.num_heads, " is not a multiple of num_kv_heads ",
              m.num_kv_heads);
  return m;
}

EngineLimits parse_limits(const Json& j) {
  EngineLimits l;
  l.max_batch_size = to_int32(j, "max_batch_size");
  l.max_input_len = to_int32(j, "max_input_len");
  l.max_seq_len = to_int32(j, "max_seq_len");
  l.max_num_tokens = to_int32(j, "max_num_tokens");
  RTLLM_CHECK(l.max_batch_size > 0 && l.max_input_len > 0 && l.max_seq_len > 0 && l.max_num_tokens > 0,
              "build_config limits must be positive (max_batch_size ", l.max_batch_size, ", max_input_len ",
              l.max_input_len, ", max_seq_len ", l.max_seq_len, ", max_num_tokens ", l.max_num_tokens, ")");
  return l;
}

// Accepts the quantizations whose op kinds exist: FP8 and FP8_PER_CHANNEL_PER_TOKEN weights (fp8_linear;
// W8A16 / W4A16: weight_only_linear; W8A8_SQ_PER_CHANNEL: int8_linear; the
// graph names the quantized ops, so nothing else here depends on the algorithm) and an unquantized or
// FP8 or INT8 KV cache (ModelRunner then runs an F8_E4M3 or I8 pool). Anything else is refused naming it.
QuantSpec parse_quant(const Json& config) {
  QuantSpec q;
  if (!config.contains("quantization") || config.at("quantization").is_null()) return q;
  const Json& j = config.at("quantization");
  RTLLM_CHECK(j.is_object(), "\"quantization\" must be an object");
  auto algo = [&](const char* key) {
    return j.contains(key) && !j.at(key).is_null() ? j.at(key).as_string() : std::string("NO_QUANT");
  };
  q.quant_algo = algo("quant_algo");
  q.kv_cache_quant_algo = algo("kv_cache_quant_algo");
  RTLLM_CHECK(q.quant_algo == "NO_QUANT" || q.quant_algo == "FP8" || q.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN" ||
                  q.quant_algo == "W8A16" || q.quant_algo == "W4A16" || q.quant_algo == "W4A16_AWQ" ||
                  q.quant_algo == "W4A16_GPTQ" || q.quant_algo == "W8A16_GPTQ" || q.quant_algo == "W8A8_SQ_PER_CHANNEL",
              "quant_algo ", q.quant_algo, " is not supported: this rtllm runs FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A16, "
              "W4A16 (also as W4A16_AWQ, W4A16_GPTQ, W8A16_GPTQ), W8A8_SQ_PER_CHANNEL and unquantized engines only "
              "(quant_algo null, NO_QUANT, FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16, W4A16_AWQ, W4A16_GPTQ, "
              "W8A16_GPTQ or W8A8_SQ_PER_CHANNEL)");
  RTLLM_CHECK(q.kv_cache_quant_algo == "NO_QUANT" || q.kv_cache_quant_algo == "FP8" ||
                  q.kv_cache_quant_algo == "INT8",
              "kv_cache_quant_algo ", q.kv_cache_quant_algo, " is not supported: this rtllm stores the KV cache "
              "unquantized, as FP8 or as INT8 (kv_cache_quant_algo null, NO_QUANT, FP8 or INT8)");
  return q;
}

// Version 1 names of what version 2 calls "logits_indices" and "num_logits".
const char* const kV1LogitsIndices = "last_token_ids";
const char* const kV1NumLogits = "num_seqs";

std::string current_name(const std::string& name) { return name == kV1LogitsIndices ? "logits_indices" : name; }

TensorSpec parse_tensor_spec(const Json& j) {
  TensorSpec t;
  t.name = current_name(j.at("name").as_string());
  t.dtype = parse_dtype(j.get_string("dtype", "float32"));
  for (const Json& d : j.at("shape").as_array()) {
    Dim dim;
    if (d.is_string()) {
      if (d.as_string() == "num_tokens") dim.kind = Dim::Kind::kNumTokens;
      else if (d.as_string() == "num_logits" || d.as_string() == kV1NumLogits) dim.kind = Dim::Kind::kNumLogits;
      else RTLLM_CHECK(false, "tensor \"", t.name, "\": unknown dim symbol \"", d.as_string(), "\"");
    } else {
      dim.value = d.as_int();
      RTLLM_CHECK(dim.value >= 0, "tensor \"", t.name, "\": negative dim ", dim.value);
    }
    t.shape.push_back(dim);
  }
  return t;
}

// config.json's "mapping": {"world_size": N, "tp_size": N}. Engines from before tensor parallelism have
// {"tp_size": 1, "tp_rank": 0} (tp_rank is per process, not per engine: ignored) or no mapping.
int32_t parse_tp_size(const Json& config) {
  if (!config.contains("mapping") || config.at("mapping").is_null()) return 1;
  const Json& m = config.at("mapping");
  RTLLM_CHECK(m.is_object(), "\"mapping\" must be an object");
  const int64_t tp = m.get_int("tp_size", 1);
  RTLLM_CHECK(tp >= 1 && tp <= 4096, "mapping.tp_size ", tp, " outside [1, 4096]");
  const int64_t world = m.get_int("world_size", tp);
  RTLLM_CHECK(world == tp, "mapping.world_size ", world, " differs from mapping.tp_size ", tp,
              ": this rtllm runs tensor parallelism only (world_size == tp_size)");
  return static_cast<int32_t>(tp);
}

// An engine rank runs num_heads / tp_size query heads and the KV heads they read: its share of them, or
// one when the ranks outnumber the KV heads (each rank holds a copy of the head its queries use).
void shard_attention_heads(ModelConfig* m, int32_t tp_size) {
  if (tp_size == 1) return;
  RTLLM_CHECK(m->num_heads % tp_size == 0, "num_heads ", m->num_heads, " does not split over tp_size ", tp_size);
  RTLLM_CHECK(m->num_kv_heads % tp_size == 0 || tp_size % m->num_kv_heads == 0, "num_kv_heads ", m->num_kv_heads,
              " neither splits over nor divides tp_size ", tp_size);
  m->num_heads /= tp_size;
  m->num_kv_heads = std::max(1, m->num_kv_heads / tp_size);
}

Graph parse_graph(const Json& j) {
  Graph g;
  for (const Json& t : j.at("inputs").as_array()) g.inputs.push_back(parse_tensor_spec(t));
  for (const Json& t : j.at("outputs").as_array()) g.outputs.push_back(parse_tensor_spec(t));
  for (const Json& t : j.at("tensors").as_array()) g.tensors.push_back(parse_tensor_spec(t));
  for (const Json& n : j.at("nodes").as_array()) {
    GraphNode node;
    node.op = n.at("op").as_string();
    for (const Json& s : n.at("inputs").as_array()) node.inputs.push_back(current_name(s.as_string()));
    for (const Json& s : n.at("outputs").as_array()) node.outputs.push_back(s.as_string());
    node.attrs = n.contains("attrs") && !n.at("attrs").is_null() ? n.at("attrs") : Json(Json::Object{});
    RTLLM_CHECK(node.attrs.is_object(), "attrs of a \"", node.op, "\" node must be an object");
    g.nodes.push_back(std::move(node));
  }
  return g;
}

// Every name a node reads must be a graph input, an earlier node's output or a stored weight.
void check_graph_names(const Graph& g, const Engine& engine, const std::string& weights_origin) {
  std::unordered_set<std::string> produced;
  for (const TensorSpec& t : g.inputs) produced.insert(t.name);
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const GraphNode& n = g.nodes[i];
    for (const std::string& name : n.inputs) {
      if (produced.count(name) || engine.has_weight(name)) continue;
      throw Error(detail::concat("graph node ", i, " (", n.op, ") reads \"", name,
                                 "\", which is neither a graph input, an earlier output nor a weight in ",
                                 weights_origin));
    }
    for (const std::string& name : n.outputs) produced.insert(name);
  }
  for (const TensorSpec& t : g.outputs)
    RTLLM_CHECK(produced.count(t.name), "graph output \"", t.name, "\" is produced by no node");
}

}  // namespace

Engine::Engine() : impl_(std::make_unique<Impl>()) {}
Engine::~Engine() = default;

void Engine::parse_config(const std::string& text, const std::string& origin) {
  Impl& im = *impl_;
  try {
    im.config = Json::parse(text);
    int64_t version = im.config.at("format_version").as_int();
    if (version < kMinFormatVersion || version > kFormatVersion)
      throw Error(detail::concat("engine format version ", version, " is not readable; this rtllm reads versions ",
                                 kMinFormatVersion, " to ", kFormatVersion, " (", origin, ")"));
    im.model = parse_model_config(im.config.at("model_config"));
    im.limits = parse_limits(im.config.at("build_config"));
    im.quant = parse_quant(im.config);
    im.tp_size = parse_tp_size(im.config);
    shard_attention_heads(&im.model, im.tp_size);
    im.graph = parse_graph(im.config.at("graph"));
  } catch (const Error& e) {
    if (std::string(e.what()).find(origin) != std::string::npos) throw;
    throw Error(detail::concat("invalid engine config ", origin, ": ", e.what()));
  }
}

void Engine::set_weights(std::vector<Weight> weights, std::shared_ptr<const void> storage,
                         const std::string& origin) {
  Impl& im = *impl_;
  im.weights = std::move(weights);
  im.storage = std::move(storage);
  for (size_t i = 0; i < im.weights.size(); ++i)
    RTLLM_CHECK_ARG(im.weight_index.emplace(im.weights[i].name, i).second, origin, ": weight \"",
                    im.weights[i].name, "\" is given twice");
  check_graph_names(im.graph, *this, origin);
}

std::shared_ptr<const Engine> Engine::load(const std::string& dir, int32_t rank) {
  std::shared_ptr<Engine> engine(new Engine());
  engine->impl_->dir = dir;
  const std::string config_path = dir + "/config.json";
  engine->parse_config(read_text_file(config_path), config_path);
  const int32_t tp_size = engine->impl_->tp_size;
  RTLLM_CHECK_ARG(rank >= 0 && rank < tp_size, "rank ", rank, " outside [0, tp_size ", tp_size, ") of the engine in ",
                  dir);
  engine->impl_->rank = rank;
  const std::string weights_path = dir + "/rank" + std::to_string(rank) + ".engine";
  auto file = std::make_shared<const SafetensorsFile>(weights_path);
  std::vector<Weight> weights = file->tensors();  // point into the mapping `file` keeps
  engine->set_weights(std::move(weights), std::move(file), weights_path);
  return engine;
}

std::shared_ptr<const Engine> Engine::from_memory(const std::string& config_json, std::vector<Weight> weights,
                                                  std::shared_ptr<const void> storage, int32_t rank) {
  static const std::string kOrigin = "in-memory engine";
  std::shared_ptr<Engine> engine(new Engine());
  engine->parse_config(config_json, kOrigin);
  const int32_t tp_size = engine->impl_->tp_size;
  RTLLM_CHECK_ARG(rank >= 0 && rank < tp_size, "rank ", rank, " outside [0, tp_size ", tp_size, ") of the ", kOrigin);
  engine->impl_->rank = rank;
  // What SafetensorsFile checks of a file entry: a known dtype (the caller parsed it), a valid shape and
  // exactly the bytes that shape holds in that dtype.
  for (const Weight& w : weights) {
    int64_t numel = 1;
    for (int64_t dim : w.shape) {
      RTLLM_CHECK_ARG(dim >= 0 && (dim == 0 || numel <= (int64_t{1} << 48) / dim), kOrigin, ": weight \"", w.name,
                      "\" has an invalid dim ", dim);
      numel *= dim;
    }
    RTLLM_CHECK_ARG(w.dtype != DataType::kInt4 || (!w.shape.empty() && w.shape.back() % 2 == 0), kOrigin,
                    ": int4 weight \"", w.name, "\" needs an even last dim");
    const uint64_t expected = dtype_num_bytes(w.dtype, numel);
    RTLLM_CHECK_ARG(w.num_bytes == expected, kOrigin, ": weight \"", w.name, "\" holds ", w.num_bytes,
                    " bytes, but its shape and dtype ", dtype_safetensors_name(w.dtype), " need ", expected);
    RTLLM_CHECK_ARG(w.data != nullptr || expected == 0, kOrigin, ": weight \"", w.name, "\" has no data");
  }
  engine->set_weights(std::move(weights), std::move(storage), kOrigin);
  return engine;
}

const std::string& Engine::dir() const { return impl_->dir; }
const Json& Engine::config() const { return impl_->config; }
const ModelConfig& Engine::model_config() const { return impl_->model; }
const EngineLimits& Engine::limits() const { return impl_->limits; }
const QuantSpec& Engine::quant() const { return impl_->quant; }
const Graph& Engine::graph() const { return impl_->graph; }
int32_t Engine::tp_size() const { return impl_->tp_size; }
int32_t Engine::rank() const { return impl_->rank; }

bool Engine::has_weight(const std::string& name) const { return impl_->weight_index.count(name) > 0; }

const Weight& Engine::weight(const std::string& name) const {
  auto it = impl_->weight_index.find(name);
  RTLLM_CHECK(it != impl_->weight_index.end(), "engine ", impl_->dir.empty() ? "(in memory)" : impl_->dir,
              " has no weight \"", name, "\"");
  return impl_->weights[it->second];
}

std::vector<std::string> Engine::weight_names() const {
  std::vector<std::string> names;
  for (const Weight& w : impl_->weights) names.push_back(w.name);
  return names;
}

}  // namespace rtllm
