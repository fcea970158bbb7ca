#include "op_registry.h"

#include <map>
#include <mutex>
#include <utility>

namespace rtllm {

namespace {
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::pair<std::string, DeviceKind>, OpFn>& registry() {
  static std::map<std::pair<std::string, DeviceKind>, OpFn> r;
  return r;
}
}  // namespace

void register_op(const std::string& name, DeviceKind device, OpFn fn) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[{name, device}] = fn;
}

OpFn find_op(const std::string& name, DeviceKind device) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto it = registry().find({name, device});
  return it == registry().end() ? nullptr : it->second;
}

void register_cpu_ops() {
  static std::once_flag once;
  std::call_once(once, [] {
    register_cpu_linear_ops();
    register_cpu_norm_ops();
    register_cpu_elementwise_ops();
    register_cpu_rope_ops();
    register_cpu_attention_ops();
  });
}

void check_num_io(const char* op, int num_inputs, int min_inputs, int max_inputs, int num_outputs,
                  int expected_outputs) {
  RTLLM_CHECK(num_inputs >= min_inputs && num_inputs <= max_inputs, "op ", op, " takes ", min_inputs, "..",
              max_inputs, " inputs, got ", num_inputs);
  RTLLM_CHECK(num_outputs == expected_outputs, "op ", op, " has ", expected_outputs, " outputs, got ",
              num_outputs);
}

void check_f32(const char* op, const TensorView& t, const char* what) {
  RTLLM_CHECK(t.dtype == DataType::kFloat32, "op ", op, ": ", what, " must be float32 on the CPU, got ",
              dtype_safetensors_name(t.dtype));
}

}  // namespace rtllm
