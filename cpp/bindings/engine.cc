// Bindings for Engine, DeviceKind, RuntimeConfig and ModelRunner.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>

#include "bindings.h"
#include "rtllm/engine.h"
#include "rtllm/model_runner.h"

namespace py = pybind11;

namespace rtllm::bindings {

namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

std::shared_ptr<Engine> load_engine(const std::string& dir, int32_t rank) {
  return std::const_pointer_cast<Engine>(Engine::load(dir, rank));
}

// The Python buffers an in-memory Engine points into, released with it. The Engine may die on a
// thread without the GIL (an executor's), so the deleter takes it; after interpreter shutdown the
// references are left alone (Python has freed everything already).
struct BufferRefs {
  std::vector<py::buffer_info> views;  // each holds its exporter (a numpy array) until released
};

std::shared_ptr<const void> hold_buffers(std::unique_ptr<BufferRefs> refs) {
  return std::shared_ptr<const void>(refs.release(), [](const void* p) {
    auto* refs = static_cast<BufferRefs*>(const_cast<void*>(p));
    if (!Py_IsInitialized()) return;
    py::gil_scoped_acquire gil;
    delete refs;
  });
}

// weights: [(name, dtype name, shape, buffer)]; each buffer C-contiguous with exactly the bytes of its
// shape in that dtype (int4: packed, two values per byte). No byte is copied.
std::shared_ptr<Engine> engine_from_memory(const std::string& config_json, const py::list& weights, int32_t rank) {
  auto refs = std::make_unique<BufferRefs>();
  std::vector<Weight> ws;
  for (const py::handle& item : weights) {
    auto entry = item.cast<py::tuple>();
    RTLLM_CHECK_ARG(entry.size() == 4, "in-memory engine: a weight must be (name, dtype, shape, buffer), got ",
                    entry.size(), " items");
    Weight w;
    w.name = entry[0].cast<std::string>();
    try {
      w.dtype = parse_dtype(entry[1].cast<std::string>());
    } catch (const Error& e) {
      throw InvalidArgument(detail::concat("in-memory engine: weight \"", w.name, "\": ", e.what()));
    }
    w.shape = entry[2].cast<std::vector<int64_t>>();
    py::buffer_info view = entry[3].cast<py::buffer>().request();
    RTLLM_CHECK_ARG(view.itemsize > 0 && view.size >= 0, "in-memory engine: weight \"", w.name, "\": empty buffer");
    ssize_t stride = view.itemsize;  // C-contiguous: strides fall from the last dim up
    for (ssize_t d = view.ndim - 1; d >= 0; --d) {
      RTLLM_CHECK_ARG(view.shape[d] <= 1 || view.strides[d] == stride, "in-memory engine: weight \"", w.name,
                      "\" is not a C-contiguous buffer");
      stride *= view.shape[d];
    }
    w.data = view.ptr;
    w.num_bytes = static_cast<size_t>(view.size * view.itemsize);
    ws.push_back(std::move(w));
    refs->views.push_back(std::move(view));
  }
  std::shared_ptr<const void> storage = hold_buffers(std::move(refs));
  py::gil_scoped_release release;  // parsing and checks touch no Python object
  return std::const_pointer_cast<Engine>(Engine::from_memory(config_json, std::move(ws), std::move(storage), rank));
}

py::array_t<float> forward(ModelRunner& runner, const Int32Array& input_ids, std::vector<int32_t> num_new_tokens,
                           std::vector<int32_t> num_cached_tokens, const Int32Array& block_table,
                           std::optional<std::vector<int32_t>> logits_indices) {
  StepInputs step;
  RTLLM_CHECK_ARG(input_ids.ndim() == 1, "input_ids must be 1-D, got ", input_ids.ndim(), " dims");
  step.input_ids.assign(input_ids.data(), input_ids.data() + input_ids.size());
  step.num_new_tokens = std::move(num_new_tokens);
  step.num_cached_tokens = std::move(num_cached_tokens);
  RTLLM_CHECK_ARG(block_table.ndim() == 2 && block_table.shape(0) == step.num_seqs(),
                  "block_table must be [num_seqs = ", step.num_seqs(), ", max_blocks_per_seq]");
  step.max_blocks_per_seq = static_cast<int32_t>(block_table.shape(1));
  step.block_table.assign(block_table.data(), block_table.data() + block_table.size());
  if (logits_indices) step.logits_indices = std::move(*logits_indices);
  const int64_t num_rows = logits_indices ? step.logits_indices.size() : step.num_seqs(), vocab = runner.vocab_size();
  py::array_t<float> logits({num_rows, vocab});
  float* dst = logits.mutable_data();
  {
    py::gil_scoped_release release;
    const float* src = runner.forward(step);
    std::memcpy(dst, src, num_rows * vocab * sizeof(float));
  }
  return logits;
}

}  // namespace

void bind_engine(py::module_& m) {
  py::enum_<DeviceKind>(m, "DeviceKind").value("CPU", DeviceKind::kCpu).value("CUDA", DeviceKind::kCuda);
  // Raw bytes of n values in one float dtype -> raw bytes in another (rtllm::convert_floats); dtypes by
  // name ("bfloat16", "F8_E4M3", ...).
  m.def(
      "convert_floats",
      [](py::array_t<uint8_t, py::array::c_style> src, const std::string& src_dtype, const std::string& dst_dtype) {
        const DataType from = parse_dtype(src_dtype), to = parse_dtype(dst_dtype);
        const int64_t bytes_per_value = std::max(1, dtype_bits(from) / 8);
        RTLLM_CHECK_ARG(src.size() % bytes_per_value == 0, "convert_floats: ", src.size(), " bytes are not whole ",
                        src_dtype, " values");
        const int64_t n = src.size() / bytes_per_value;
        py::array_t<uint8_t> dst(static_cast<int64_t>(dtype_num_bytes(to, n)));
        convert_floats(src.data(), from, dst.mutable_data(), to, n);
        return dst;
      },
      py::arg("src"), py::arg("src_dtype"), py::arg("dst_dtype"));
  m.def("cuda_available", &cuda_available, "True when this build has the CUDA backend and a CUDA device is present");
  m.def("cpu_amx_available", &cpu_amx_available,
        "True when the CPU linear runs BF16 weights on AMX (RTLLM_CPU_AMX=0 turns it off at engine load, "
        "RTLLM_CPU_AMX=1 adds F16 weights)");

  py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
      .def_static("load", &load_engine, py::arg("dir"), py::arg("rank") = 0, py::call_guard<py::gil_scoped_release>())
      // config_json: the config.json text; weights: [(name, dtype, shape, buffer)], kept alive (not
      // copied) as long as the Engine and the runners built on it.
      .def_static("from_memory", &engine_from_memory, py::arg("config_json"), py::arg("weights"), py::arg("rank") = 0)
      .def_property_readonly("dir", &Engine::dir)
      .def_property_readonly("config_json", [](const Engine& e) { return e.config().dump(2); })
      .def_property_readonly("architecture", [](const Engine& e) { return e.model_config().architecture; })
      .def_property_readonly("vocab_size", [](const Engine& e) { return e.model_config().vocab_size; })
      .def_property_readonly("hidden_size", [](const Engine& e) { return e.model_config().hidden_size; })
      .def_property_readonly("num_layers", [](const Engine& e) { return e.model_config().num_layers; })
      .def_property_readonly("num_heads", [](const Engine& e) { return e.model_config().num_heads; })
      .def_property_readonly("num_kv_heads", [](const Engine& e) { return e.model_config().num_kv_heads; })
      .def_property_readonly("head_dim", [](const Engine& e) { return e.model_config().head_dim; })
      .def_property_readonly("bos_token_id", [](const Engine& e) { return e.model_config().bos_token_id; })
      .def_property_readonly("eos_token_ids", [](const Engine& e) { return e.model_config().eos_token_ids; })
      .def_property_readonly("max_batch_size", [](const Engine& e) { return e.limits().max_batch_size; })
      .def_property_readonly("max_input_len", [](const Engine& e) { return e.limits().max_input_len; })
      .def_property_readonly("max_seq_len", [](const Engine& e) { return e.limits().max_seq_len; })
      .def_property_readonly("max_num_tokens", [](const Engine& e) { return e.limits().max_num_tokens; })
      .def_property_readonly("tp_size", &Engine::tp_size)
      .def_property_readonly("rank", &Engine::rank)
      .def("weight_names", &Engine::weight_names);

  py::class_<RuntimeConfig>(m, "RuntimeConfig")
      .def(py::init([](DeviceKind device, int32_t max_num_tokens, int32_t max_batch_size, int32_t num_kv_blocks,
                       int32_t tokens_per_block, int32_t num_threads, bool enable_cuda_graphs,
                       float kv_free_memory_fraction, bool device_sampling,
                       const std::optional<std::string>& kv_cache_dtype, int32_t max_num_logits) {
             RuntimeConfig c{device,      max_num_tokens,     max_batch_size,         num_kv_blocks,
                             tokens_per_block, num_threads, enable_cuda_graphs, kv_free_memory_fraction};
             c.device_sampling = device_sampling;
             if (kv_cache_dtype) c.kv_cache_dtype = parse_dtype(*kv_cache_dtype);
             c.max_num_logits = max_num_logits;
             return c;
           }),
           py::arg("device") = DeviceKind::kCpu, py::arg("max_num_tokens") = 0, py::arg("max_batch_size") = 0,
           py::arg("num_kv_blocks") = 0, py::arg("tokens_per_block") = 32, py::arg("num_threads") = 0,
           py::arg("enable_cuda_graphs") = true, py::arg("kv_free_memory_fraction") = 0.0f,
           py::arg("device_sampling") = true, py::arg("kv_cache_dtype") = std::nullopt,
           py::arg("max_num_logits") = 0)
      .def_readwrite("device", &RuntimeConfig::device)
      .def_readwrite("max_num_tokens", &RuntimeConfig::max_num_tokens)
      .def_readwrite("max_batch_size", &RuntimeConfig::max_batch_size)
      .def_readwrite("num_kv_blocks", &RuntimeConfig::num_kv_blocks)
      .def_readwrite("tokens_per_block", &RuntimeConfig::tokens_per_block)
      .def_readwrite("num_threads", &RuntimeConfig::num_threads)
      .def_readwrite("enable_cuda_graphs", &RuntimeConfig::enable_cuda_graphs)
      .def_readwrite("kv_free_memory_fraction", &RuntimeConfig::kv_free_memory_fraction)
      .def_readwrite("device_sampling", &RuntimeConfig::device_sampling)
      .def_readwrite("max_num_logits", &RuntimeConfig::max_num_logits)
      // A Communicator (mpi_world_communicator()) for a tensor-parallel engine; None: one rank.
      .def_readwrite("communicator", &RuntimeConfig::communicator)
      // A dtype name ("bfloat16", "F8_E4M3", ...) or None for the backend's default; reads back the
      // safetensors name.
      .def_property(
          "kv_cache_dtype",
          [](const RuntimeConfig& c) -> std::optional<std::string> {
            if (!c.kv_cache_dtype) return std::nullopt;
            return std::string(dtype_safetensors_name(*c.kv_cache_dtype));
          },
          [](RuntimeConfig& c, const std::optional<std::string>& name) {
            c.kv_cache_dtype = name ? std::optional<DataType>(parse_dtype(*name)) : std::nullopt;
          })
      .def("__repr__", [](const RuntimeConfig& c) {
        return detail::concat("RuntimeConfig(device=", c.device == DeviceKind::kCpu ? "CPU" : "CUDA",
                              ", max_num_tokens=", c.max_num_tokens, ", max_batch_size=", c.max_batch_size,
                              ", num_kv_blocks=", c.num_kv_blocks, ", tokens_per_block=", c.tokens_per_block,
                              ", num_threads=", c.num_threads, ", enable_cuda_graphs=",
                              c.enable_cuda_graphs ? "True" : "False", ", kv_free_memory_fraction=",
                              c.kv_free_memory_fraction, ", device_sampling=",
                              c.device_sampling ? "True" : "False", ")");
      });

  py::class_<ModelRunner>(m, "ModelRunner")
      .def(py::init([](std::shared_ptr<Engine> engine, const RuntimeConfig& config) {
             return std::make_unique<ModelRunner>(std::move(engine), config);
           }),
           py::arg("engine"), py::arg("runtime_config") = RuntimeConfig{}, py::call_guard<py::gil_scoped_release>())
      .def("forward", &forward, py::arg("input_ids"), py::arg("num_new_tokens"), py::arg("num_cached_tokens"),
           py::arg("block_table"), py::arg("logits_indices") = std::nullopt)
      // [(source, destination)]: whole KV blocks, every layer, before the next forward.
      .def("copy_blocks", &ModelRunner::copy_blocks, py::arg("copies"), py::call_guard<py::gil_scoped_release>())
      // Calibration: observe_amax([tensor names]) records each node output's running amax |value| over the
      // following steps; observed_amax() -> {name: amax}; kv_cache_amax(block_table, num_tokens) -> per
      // layer (amax |K|, amax |V|) of one sequence's tokens in the pool.
      .def("observe_amax", &ModelRunner::observe_amax, py::arg("tensor_names"),
           py::call_guard<py::gil_scoped_release>())
      .def("observed_amax",
           [](const ModelRunner& r) {
             py::dict d;
             for (const auto& [name, amax] : r.observed_amax()) d[py::str(name)] = amax;
             return d;
           })
      // observe_channel_amax([tensor names]) and observed_channel_amax() -> {name: float32 [columns]}: the
      // same per column (CPU only).
      .def("observe_channel_amax", &ModelRunner::observe_channel_amax, py::arg("tensor_names"),
           py::call_guard<py::gil_scoped_release>())
      .def("observed_channel_amax",
           [](const ModelRunner& r) {
             py::dict d;
             for (const auto& [name, amax] : r.observed_channel_amax()) {
               py::array_t<float> a(static_cast<py::ssize_t>(amax.size()));
               std::copy(amax.begin(), amax.end(), a.mutable_data());
               d[py::str(name)] = a;
             }
             return d;
           })
      // capture_outputs([tensor names]) keeps a copy of each node output after every step; captured(name)
      // -> float32 array [rows, cols] of the latest step (AWQ / GPTQ calibration).
      .def("capture_outputs", &ModelRunner::capture_outputs, py::arg("tensor_names"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "captured",
          [](const ModelRunner& r, const std::string& name) {
            auto [rows, cols, values] = r.captured(name);
            py::array_t<float> out({rows, cols});
            std::copy(values.begin(), values.end(), out.mutable_data());
            return out;
          },
          py::arg("tensor_name"))
      .def(
          "kv_cache_amax",
          [](ModelRunner& r, std::vector<int32_t> block_table, int32_t num_tokens) {
            std::vector<std::array<float, 2>> amax;
            {
              py::gil_scoped_release release;
              amax = r.kv_cache_amax(block_table, num_tokens);
            }
            std::vector<std::pair<float, float>> out;
            for (const auto& a : amax) out.emplace_back(a[0], a[1]);
            return out;
          },
          py::arg("block_table"), py::arg("num_tokens"))
      .def_property_readonly("config", &ModelRunner::config)  // with the 0 fields resolved
      .def_property_readonly("vocab_size", &ModelRunner::vocab_size)
      .def_static(
          "kv_bytes_per_block",
          [](const Engine& engine, int32_t tokens_per_block, const std::string& kv_cache_dtype) {
            return ModelRunner::kv_bytes_per_block(engine.model_config(), tokens_per_block,
                                                   parse_dtype(kv_cache_dtype));
          },
          py::arg("engine"), py::arg("tokens_per_block"), py::arg("kv_cache_dtype") = "float32")
      .def_property_readonly("kv_pool_bytes", &ModelRunner::kv_pool_bytes);
}

}  // namespace rtllm::bindings
