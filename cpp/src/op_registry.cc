#include "op_registry.h"

#include <cmath>
#include <map>
#include <mutex>
#include <utility>

namespace rtllm {

namespace {
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::pair<std::string, DeviceKind>, OpFactory>& registry() {
  static std::map<std::pair<std::string, DeviceKind>, OpFactory> r;
  return r;
}
}  // namespace

const char* device_name(DeviceKind device) { return device == DeviceKind::kCpu ? "CPU" : "CUDA"; }

std::string shape_string(const TensorSpec& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.shape.size(); ++i) {
    const Dim& d = t.shape[i];
    s += (i ? ", " : "") + (d.kind == Dim::Kind::kFixed ? std::to_string(d.value)
                            : d.kind == Dim::Kind::kNumTokens ? std::string("num_tokens") : std::string("num_logits"));
  }
  return s + "]";
}

void register_op(const std::string& name, DeviceKind device, OpFactory factory) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[{name, device}] = factory;
}

std::unique_ptr<OpKind> create_op(const OpSpec& spec) {
  const DeviceKind device = spec.backend->device;
  OpFactory factory = nullptr;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find({spec.op(), device});
    if (it != registry().end()) factory = it->second;
  }
  RTLLM_CHECK(factory, "op \"", spec.op(), "\" has no ", device_name(device), " implementation");
  return factory(spec);
}

void register_cpu_ops() {
  static std::once_flag once;
  std::call_once(once, [] {
    register_cpu_linear_ops();
    register_cpu_fp8_linear_ops();
    register_cpu_weight_only_linear_ops();
    register_cpu_int8_linear_ops();
    register_cpu_norm_ops();
    register_cpu_elementwise_ops();
    register_cpu_rope_ops();
    register_cpu_attention_ops();
    register_cpu_collective_ops();
  });
}

DataType OpSpec::activation_dtype(size_t i) const {
  const DataType stored = inputs.at(i).dtype;
  return stored == DataType::kFloat32 && !input_is_weight.at(i) ? backend->activation_dtype : stored;
}

void OpSpec::require_input_dtype(size_t i, const std::vector<DataType>& supported) const {
  const TensorSpec& t = inputs.at(i);
  for (DataType d : supported)
    if (t.dtype == d) return;
  std::string names;
  for (DataType d : supported) names += std::string(names.empty() ? "" : ", ") + dtype_safetensors_name(d);
  RTLLM_CHECK(false, "op \"", op(), "\" on the ", device_name(backend->device), " backend does not support dtype ",
              dtype_safetensors_name(t.dtype), " for input ", i, " (\"", t.name, "\"); supported: ", names);
}

void OpSpec::require_num_io(size_t min_inputs, size_t max_inputs, size_t num_outputs) const {
  RTLLM_CHECK(inputs.size() >= min_inputs && inputs.size() <= max_inputs, "op \"", op(), "\" takes ", min_inputs,
              "..", max_inputs, " inputs, the node has ", inputs.size());
  RTLLM_CHECK(outputs.size() == num_outputs, "op \"", op(), "\" has ", num_outputs, " outputs, the node has ",
              outputs.size());
}

float fp8_output_scale(const OpSpec& spec) {
  if (spec.outputs.empty() || spec.outputs[0].dtype != DataType::kFloat8E4M3) return 0.0f;
  const float scale = static_cast<float>(spec.node->attrs.get_double("output_scale", 0.0));
  RTLLM_CHECK(std::isfinite(scale) && scale > 0.0f, "op \"", spec.op(), "\": output \"", spec.outputs[0].name,
              "\" is F8_E4M3, and attr output_scale (", scale, ") must be finite and > 0");
  return scale;
}

WeightPlacement OpKind::weight_placement(size_t input) const {
  return {spec_.inputs.at(input).dtype, WeightLayout::kRowMajor};
}

}  // namespace rtllm
