// Hopper (sm_90a) building blocks of rtllm's wgmma GEMMs (fp8_gemm.cu, weight_only_gemm.cu): mbarriers,
// TMA loads and shared-memory matrix descriptors on the device; on the host, the tensor maps TMA reads
// through.
//
// Shared memory operands are K-major with the 128-byte swizzle, as TMA writes them with
// CU_TENSOR_MAP_SWIZZLE_128B: row r of a tile is 128 bytes at r · 128, its 16-byte chunk c stored at chunk
// c ^ (r % 8); tiles start on 1024-byte boundaries. A descriptor gives the start address, the stride between
// 8-row groups (1024 bytes) and the swizzle mode; a wgmma's slice of K starts that many bytes into the rows.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "dispatch.cuh"

// The device code of the GEMMs exists only in sm_90a builds (wgmma and TMA need the architecture); other
// architectures compile the kernels to a trap, and the launchers refuse devices other than 9.0.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RTLLM_HOPPER_WGMMA 1
#endif

namespace rtllm::kernels::hopper {

// Threads of a warp-specialized kernel: two consumer warpgroups and a producer warpgroup (see
// consumer_take_registers). Fewer (two warpgroups and a producer warp) cannot give the consumers more than
// 168 registers: each SM quarter holds three of the warps and 16384 registers.
constexpr int kSpecializedThreads = 384;

#ifdef RTLLM_HOPPER_WGMMA
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Warp-specialized kernels launch three warpgroups at 168 registers a thread (__launch_bounds__(384, 1): an
// SM quarter holds three warps of 65536 / 4 registers), then the producer warpgroup gives registers back and
// the two consumer warpgroups take them: 40 + 2 x 232 per quarter's three warps still fits. Every thread of
// a warpgroup executes the same one.
__device__ __forceinline__ void producer_release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
}
__device__ __forceinline__ void consumer_take_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// After the initializing thread's mbar_init calls, before the CTA's __syncthreads().
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// Waits until the barrier's phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// Thread-block clusters (TMA multicast): this CTA's rank in its cluster; a barrier of all threads of the
// cluster (release / acquire: shared-memory writes before it are visible to the peers after it).
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The end of a kernel run by clusters of kCluster CTAs: no CTA exits while its peer may still write into its
// shared memory or arrive on its barriers.
template <int kCluster>
__device__ __forceinline__ void cluster_exit() {
  if constexpr (kCluster > 1) {
    __syncwarp();    // a producer warp's lanes reconverge for the cluster barrier
    cluster_sync();
  }
}
// Arrives on the mbarrier at the same shared-memory offset in CTA `cta` of the cluster.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(bar)), "r"(cta));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// One TMA box (coordinates: the element in the row, the row) into shared memory; completes its bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(void* smem, const CUtensorMap* map, int32_t col, int32_t row,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_u32(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(smem_u32(bar))
      : "memory");
}

// The same box into the same shared-memory offset of every CTA in cta_mask (bit i: cluster rank i), each
// completing its bytes on its own mbarrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(void* smem, const CUtensorMap* map, int32_t col, int32_t row,
                                                      uint64_t* bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;" ::"r"(smem_u32(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(smem_u32(bar)), "h"(cta_mask)
      : "memory");
}

// Matrix descriptor of a K-major, 128-byte-swizzled operand starting at `smem` (1024-byte aligned, or a
// multiple of 16 bytes past such a start for a later slice of K): address >> 4 in bits 0-13, leading-
// dimension offset (unused by this layout; 16 bytes) in 16-29, stride between 8-row groups (1024 bytes) in
// 32-45, swizzle mode 1 (128 bytes) in 62-63.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t smem) {
  return uint64_t((smem & 0x3FFFF) >> 4) | (uint64_t(16 >> 4) << 16) | (uint64_t(1024 >> 4) << 32) | (1ull << 62);
}

// The 64 float32 accumulators of an m64n128 wgmma (d[0..63]) as inline-asm operands %0 .. %63.
#define RTLLM_WGMMA_ACC8(d, i)                                                                              \
  "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define RTLLM_WGMMA_ACC64(d)                                                                                 \
  RTLLM_WGMMA_ACC8(d, 0), RTLLM_WGMMA_ACC8(d, 8), RTLLM_WGMMA_ACC8(d, 16), RTLLM_WGMMA_ACC8(d, 24),          \
      RTLLM_WGMMA_ACC8(d, 32), RTLLM_WGMMA_ACC8(d, 40), RTLLM_WGMMA_ACC8(d, 48), RTLLM_WGMMA_ACC8(d, 56)
#define RTLLM_WGMMA_ACC64_REGS                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "  \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "  \
  "%62, %63}"

// d (64 x 128, float32) += A (64 x 16 of T, registers) · B (16 x 128 of T, shared memory through desc_b):
// B K-major, or MN-major with kTransB.
template <typename T, bool kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " RTLLM_WGMMA_ACC64_REGS
                 ", {%64, %65, %66, %67}, %68, 1, 1, 1, %69;"
                 : RTLLM_WGMMA_ACC64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(kTransB ? 1 : 0)
                 : "memory");
  } else {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " RTLLM_WGMMA_ACC64_REGS
                 ", {%64, %65, %66, %67}, %68, 1, 1, 1, %69;"
                 : RTLLM_WGMMA_ACC64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(kTransB ? 1 : 0)
                 : "memory");
  }
}

// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMAs.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif  // RTLLM_HOPPER_WGMMA

// cuTensorMapEncodeTiled from the driver (through the runtime: no link against libcuda), or null.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// rtllm's Hopper GEMMs (FP8, int4 weight-only) unless RTLLM_HOPPER_GEMM=0 sends their shapes back to the
// cuBLASLt paths (a same-build comparison).
inline bool hopper_gemm_enabled() {
  static const bool enabled = !env_is("RTLLM_HOPPER_GEMM", "0");
  return enabled;
}

// A row-major [rows, cols] matrix of `type` (elements of elem_bytes), read in boxes of box_rows rows x 128
// bytes with the 128-byte swizzle; out-of-range parts of a box arrive as zeros. The row pitch (cols ·
// elem_bytes) must be a multiple of 16 and data 16-byte aligned. False where the driver refuses it.
inline bool encode_sw128_rows(CUtensorMap* map, const void* data, CUtensorMapDataType type, int64_t elem_bytes,
                              int64_t rows, int64_t cols, uint32_t box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (!encode) return false;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(cols * elem_bytes)};  // bytes between rows
  const cuuint32_t box[2] = {cuuint32_t(128 / elem_bytes), box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map, type, 2, const_cast<void*>(data), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The launch attribute of clusters of `cluster` CTAs along x.
inline cudaLaunchAttribute cluster_dimension(int cluster) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  return attribute;
}

// How many clusters of the launch shape fit on the device at once, per (kernel, device, cluster, threads,
// shared memory): the shared-memory opt-in and the occupancy query cost microseconds of host time, which
// every eager launch of a linear would pay again. Cached for the process once they succeed.
struct PersistentShape {
  const void* kernel;
  int device, cluster, threads;
  size_t smem_bytes;
  bool operator<(const PersistentShape& o) const {
    return std::tie(kernel, device, cluster, threads, smem_bytes) <
           std::tie(o.kernel, o.device, o.cluster, o.threads, o.smem_bytes);
  }
};

// Clusters of `cluster` CTAs of `kernel` that fit on `device` (0 when none), from the cache or asked now.
template <typename... KernelArgs>
cudaError_t persistent_fit(void (*kernel)(KernelArgs...), int device, int cluster, int threads, size_t smem_bytes,
                           int* fit) {
  static std::mutex mutex;
  static std::map<PersistentShape, int> known;
  const PersistentShape shape{reinterpret_cast<const void*>(kernel), device, cluster, threads, smem_bytes};
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(shape);
  if (it != known.end()) {
    *fit = it->second;
    return cudaSuccess;
  }
  // A host-side attribute, safe during graph capture, and per device.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes);
  int sms = 0;
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute cluster_shape = cluster_dimension(cluster);  // the occupancy query takes only this
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((unsigned)(sms / cluster * cluster));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.attrs = &cluster_shape;
  config.numAttrs = 1;
  err = cudaOccupancyMaxActiveClusters(fit, kernel, &config);
  if (err == cudaSuccess) known.emplace(shape, *fit);
  return err;
}

// Launches a persistent kernel: as many clusters of `cluster` CTAs (1 or 2) as fit on the current device at
// once (one CTA per SM; clusters are placed within a GPC, so pairs may leave an SM out), at most num_tiles,
// each cluster taking every (gridDim / cluster)-th tile; with smem_bytes of dynamic shared memory and
// programmatic dependent launch when enabled. A cluster that could not start with the others would run its
// tiles after them: the grid never holds more clusters than fit.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_persistent(void (*kernel)(KernelArgs...), int64_t num_tiles, int cluster, int threads,
                              size_t smem_bytes, cudaStream_t stream, Args... args) {
  int device = 0, fit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = persistent_fit(kernel, device, cluster, threads, smem_bytes, &fit);
  if (err != cudaSuccess) return err;
  if (fit < 1) return cudaErrorInvalidConfiguration;
  cudaLaunchAttribute attributes[2];
  attributes[0] = cluster_dimension(cluster);
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = programmatic_launch_enabled() ? 1 : 0;
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = attributes;
  const int64_t clusters = num_tiles < fit ? num_tiles : fit;
  config.gridDim = dim3((unsigned)(clusters * cluster));
  config.numAttrs = 2;
  err = cudaLaunchKernelEx(&config, kernel, static_cast<KernelArgs>(args)...);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

}  // namespace rtllm::kernels::hopper
