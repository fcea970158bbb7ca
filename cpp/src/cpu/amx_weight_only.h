// weight_only_linear's kernel on Intel AMX (AMX-BF16 tiles) for int8 and int4 codes, and the layouts it
// reads, placed once at load by the CPU runner:
//   codes (WeightLayout::kCpuAmxCodeTiles): [num_col_blocks(N), num_k_steps(K), 32, 32], the BF16 tile
//     order of amx_linear.h, step[16 h + i][2 j + p] = q[32 b + 16 h + j][32 s + 2 i + p], zero past N and
//     K. Int8: one code a byte. Int4: the step's 32 rows of 32 codes e = 2 j + p in fours of 64 bytes,
//     little-endian 16-bit word e of a four holding code e of its row f in nibble f (bits 4 f .. 4 f + 3),
//     so that a shift and a mask give a whole row, one code a word.
//   scale and offset (WeightLayout::kCpuAmxGroupCols): [num_col_blocks(N), num_groups, 32] float32,
//     [b][g][c] = v[32 b + c][g], zero past N: one block's values of a group are two vectors.
// The linear op recognizes them by those shapes. Numerics: amx_weight_only.cc.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/amx_linear.h"  // the column blocks and k steps of the tile layouts

namespace rtllm {
class ThreadPool;
}

namespace rtllm::cpu {

// Whether weight_only_linear runs codes of a [N, K] weight with this group size on AMX tiles: AMX is
// usable and asked for as for F16 weights (amx_linear_enabled(true): RTLLM_CPU_AMX=1), and every group
// is whole k steps of 32 (group_size a multiple of 32, or one group of all K).
bool amx_weight_only_usable(int64_t K, int64_t group_size);

// Codes [N, K] as stored (int8 one a byte; int4 two a byte, k even in the low nibble, two's complement)
// -> the tile layout above (amx_num_col_blocks(N) * amx_num_k_steps(K) * 1024 codes).
void pack_amx_codes(const uint8_t* codes, bool int4, int64_t N, int64_t K, uint8_t* tiles);

// Per-group values v [N, num_groups] float32 -> [num_col_blocks(N), num_groups, 32] as above.
void pack_amx_group_cols(const float* v, int64_t N, int64_t num_groups, float* out);

// Workspace of amx_weight_only_linear for up to max_rows rows of x on num_threads threads.
size_t amx_weight_only_workspace_bytes(int64_t K, int64_t num_groups, int64_t max_rows, int num_threads);

// y[T, N] = x[T, K] · Wᵀ (+ bias[N]), W[n, k] = q[n, k] · scale[n, g] (+ offset[n, g]), g = k / group_size,
// with codes, scale and offset as placed above; x, y float32 row-major, bias [N] or null, offset or null.
// Throws Error where AMX is not usable.
void amx_weight_only_linear(ThreadPool& pool, const float* x, const uint8_t* codes, bool int4, const float* scale,
                            const float* offset, const float* bias, float* y, int64_t T, int64_t K, int64_t N,
                            int64_t group_size, void* workspace);

}  // namespace rtllm::cpu
