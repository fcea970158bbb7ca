// The linear op's kernel for BF16 and F16 weights on Intel AMX (AMX-BF16 tiles), and the weight layout it
// reads (WeightLayout::kCpuAmxTiles), placed once at load by the CPU runner:
//   tiles[num_col_blocks(N)][num_k_steps(K)][32][32] of 16-bit values (BF16 or F16 bits, as stored),
//   BF16: tiles[b][s][16 * h + i][2 * j + p] = W[32 * b + 16 * h + j][32 * s + 2 * i + p]
//   F16:  tiles[b][s][16 * h + i][16 * p + j] = the same W value,           zero past N and K.
// A [32][32] step is two AMX B tiles of 16 rows x 64 bytes, one per half h of the block's 32 columns.
// BF16 ones are in the VNNI order TDPBF16PS reads (k values 2i and 2i+1 of a column side by side); F16
// ones keep each row planar (16 columns at k = 2i, then at 2i + 1), the order in which the kernel's
// split into two bf16 tiles makes VNNI rows without shuffles. The placed tensor
// keeps this 4-d shape; the linear op recognizes AMX tiles by it. Numerics: amx_linear.cc.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rtllm {
class ThreadPool;
}

namespace rtllm::cpu {

constexpr int64_t kAmxBlockCols = 32;  // columns of W per block: two B tiles of 16
constexpr int64_t kAmxStepK = 32;      // k values per step: one A tile row of 64 bytes of bf16

inline int64_t amx_num_col_blocks(int64_t N) { return (N + kAmxBlockCols - 1) / kAmxBlockCols; }
inline int64_t amx_num_k_steps(int64_t K) { return (K + kAmxStepK - 1) / kAmxStepK; }

// Whether a CPU kernel of this kind runs on AMX: rtllm was built with AMX-BF16 (-march of a CPU that has
// it), this CPU has AMX-TILE, AMX-BF16 and AVX512-BF16 (CPUID), Linux grants the process the tile data
// state (arch_prctl, asked once), and the environment variable RTLLM_CPU_AMX allows it: "0" never, "1"
// for every kind, anything else (or unset) only for kinds that are not opt_in. BF16 weights are not;
// F16 weights and weight_only_linear's integer codes (cpu/amx_weight_only.h) are, since their decode
// would slow. Read at every call: an op kind asks once, when an engine loads, so a test can load one
// engine each way.
bool amx_linear_enabled(bool opt_in);

// w [N, K] row-major 16-bit values -> tiles as above (amx_num_col_blocks(N) * amx_num_k_steps(K) * 1024
// values). Plain C++: the runner may place the layout wherever the op asks for it. Returns false (tiles
// unspecified) for an F16 w holding ±inf, which the kernel's split cannot carry: place it otherwise.
bool pack_amx_weight(const uint16_t* w, int64_t N, int64_t K, bool fp16, uint16_t* tiles);

// Workspace of amx_linear for up to max_rows rows of x on num_threads threads.
size_t amx_linear_workspace_bytes(int64_t K, int64_t max_rows, int num_threads);

// y[T, N] = x[T, K] · Wᵀ (+ bias[N]) with W as AMX tiles of BF16 (fp16 false) or F16 (fp16 true) bits;
// x, y float32 row-major. Throws Error when AMX is not usable (amx_linear_enabled() ignoring the variable).
void amx_linear(ThreadPool& pool, const float* x, const uint16_t* tiles, bool fp16, const float* bias, float* y,
                int64_t T, int64_t K, int64_t N, void* workspace);

}  // namespace rtllm::cpu
