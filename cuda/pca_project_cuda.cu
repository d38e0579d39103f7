// CUDA twin of src/kernels/pca_project_cpu.cpp: the codec's two products for every compressed layer of a
// bucket in one launch (a grouped GEMM), and the float64 sample moments of a fit.
//
// Why one hand-written kernel and not a cuBLAS call per layer: a bucket holds 10-50 conv layers of different
// shapes, each a small GEMM; one launch over a tile table keeps the GPU busy across all of them and needs no
// host round trip (the table is the kernel's parameter). Each output element is summed by one thread in a
// fixed order, so the result is the same on every GPU of one architecture.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "launch.h"

namespace gradiveq::detail::cuda {

namespace {

constexpr int kTileInner = 16;  // inner elements staged in shared memory per step
constexpr int kThreads = 256;   // 16 x 16 threads, each owning 4 x 4 outputs of the 64 x 64 tile
constexpr int kPerThread = 4;

struct JobTable {
  GemmJob jobs[kMaxJobs];
  int32_t tile_start[kMaxJobs + 1];  // prefix sums of the jobs' tile counts
  int32_t count;
};

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }

template <typename Out, typename Acc>
__device__ __forceinline__ Out narrow_to(Acc x);
template <>
__device__ __forceinline__ float narrow_to<float, float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow_to<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half narrow_to<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ double narrow_to<double, double>(double x) {
  return x;
}

// Element (r, l) of a tile of op(a): rows r, inner l.
template <bool kTransA>
__device__ __forceinline__ float load_a(const GemmJob& job, int64_t r, int64_t l) {
  if (r >= job.rows || l >= job.inner) return 0.0f;
  const float* a = static_cast<const float*>(job.a);
  return kTransA ? a[l * job.a_stride + r] : a[r * job.a_stride + l];
}

// Element (l, c) of op(b).
template <typename B, bool kTransB>
__device__ __forceinline__ float load_b(const GemmJob& job, int64_t l, int64_t c) {
  if (l >= job.inner || c >= job.cols) return 0.0f;
  const B* b = static_cast<const B*>(job.b);
  return widen(kTransB ? b[c * job.inner + l] : b[l * job.cols + c]);
}

// Which job and tile this block computes: the table is at most kMaxJobs long, so a linear scan is cheap.
__device__ __forceinline__ int find_job(const JobTable& table, int tile) {
  int j = 0;
  while (j + 1 < table.count && tile >= table.tile_start[j + 1]) ++j;
  return j;
}

// Inner elements per split, a multiple of the staging step.
__host__ __device__ __forceinline__ int64_t split_chunk(const GemmJob& job) {
  const int64_t per = (job.inner + job.splits - 1) / job.splits;
  return (per + kTileInner - 1) / kTileInner * kTileInner;
}

// Second pass of split jobs (float32 projections only): partial sums added in split order, then bias, scale
// and the cast, one thread per output. Blocks of other jobs return at once.
template <typename Out>
__global__ void reduce_splits(const JobTable table) {
  const GemmJob& job = table.jobs[blockIdx.y];
  if (job.splits <= 1) return;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= job.rows * job.cols) return;
  const int64_t r = i / job.cols, c = i % job.cols;
  float sum = 0.0f;
  for (int s = 0; s < job.splits; ++s) sum += job.partials[s * job.rows * job.cols + i];
  const float bias = job.bias ? job.bias[c] : 0.0f;
  static_cast<Out*>(job.out)[r * job.out_stride + c] = narrow_to<Out, float>((sum + bias) * job.scale);
}

template <typename Acc, typename B, typename Out, bool kTransA, bool kTransB>
__global__ void __launch_bounds__(kThreads) grouped_gemm(const JobTable table) {
  const int j = find_job(table, int(blockIdx.x));
  const GemmJob& job = table.jobs[j];
  const int tiles_across = int((job.cols + kTileCols - 1) / kTileCols);
  const int local = (int(blockIdx.x) - table.tile_start[j]) / job.splits;
  const int split = (int(blockIdx.x) - table.tile_start[j]) % job.splits;
  const int64_t row0 = int64_t(local / tiles_across) * kTileRows,
                col0 = int64_t(local % tiles_across) * kTileCols;
  const int64_t chunk = split_chunk(job);
  const int64_t inner_begin = split * chunk, inner_end = min(job.inner, inner_begin + chunk);

  // One column of padding: staging writes that stride through the inner index fall in different banks.
  __shared__ Acc a_tile[kTileInner][kTileRows + 1];
  __shared__ Acc b_tile[kTileInner][kTileCols + 1];
  const int tid = int(threadIdx.x), tx = tid % 16, ty = tid / 16;
  Acc acc[kPerThread][kPerThread] = {};

  for (int64_t l0 = inner_begin; l0 < inner_end; l0 += kTileInner) {
    // Coalesced staging: consecutive threads read consecutive addresses of whichever layout is stored.
    for (int i = tid; i < kTileInner * kTileRows; i += kThreads) {
      const int r = kTransA ? i % kTileRows : i / kTileInner, l = kTransA ? i / kTileRows : i % kTileInner;
      a_tile[l][r] = l0 + l < inner_end ? Acc(load_a<kTransA>(job, row0 + r, l0 + l)) : Acc(0);
    }
    for (int i = tid; i < kTileInner * kTileCols; i += kThreads) {
      const int c = kTransB ? i / kTileInner : i % kTileCols, l = kTransB ? i % kTileInner : i / kTileCols;
      b_tile[l][c] = Acc(load_b<B, kTransB>(job, l0 + l, col0 + c));
    }
    __syncthreads();
#pragma unroll
    for (int l = 0; l < kTileInner; ++l) {
      Acc a[kPerThread], b[kPerThread];
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) {
        a[t] = a_tile[l][ty + 16 * t];
        b[t] = b_tile[l][tx + 16 * t];
      }
#pragma unroll
      for (int y = 0; y < kPerThread; ++y) {
#pragma unroll
        for (int x = 0; x < kPerThread; ++x) acc[y][x] += a[y] * b[x];
      }
    }
    __syncthreads();
  }

  Out* out = static_cast<Out*>(job.out);
#pragma unroll
  for (int y = 0; y < kPerThread; ++y) {
    const int64_t r = row0 + ty + 16 * y;
    if (r >= job.rows) continue;
#pragma unroll
    for (int x = 0; x < kPerThread; ++x) {
      const int64_t c = col0 + tx + 16 * x;
      if (c >= job.cols) continue;
      if (job.splits > 1) {  // the reduction pass finishes it
        job.partials[(int64_t(split) * job.rows + r) * job.cols + c] = float(acc[y][x]);
        continue;
      }
      const Acc bias = job.bias ? Acc(job.bias[c]) : Acc(0);
      const Acc v = (acc[y][x] + bias) * Acc(job.scale);
      Out& dst = out[r * job.out_stride + c];
      dst = job.accumulate ? narrow_to<Out, Acc>(Acc(dst) + v) : narrow_to<Out, Acc>(v);
    }
  }
}

int64_t output_tiles(const GemmJob& job) {
  return ((job.rows + kTileRows - 1) / kTileRows) * ((job.cols + kTileCols - 1) / kTileCols);
}
int64_t tiles_of(const GemmJob& job) { return output_tiles(job) * job.splits; }

JobTable make_table(const GemmJob* jobs, int count) {
  if (count < 1 || count > kMaxJobs) {
    throw std::invalid_argument("gradiveq CUDA projection: " + std::to_string(count) + " jobs, expected 1.." +
                                std::to_string(kMaxJobs));
  }
  JobTable table{};
  table.count = count;
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) {
    table.jobs[i] = jobs[i];
    table.tile_start[i] = int32_t(tiles);
    tiles += tiles_of(jobs[i]);
  }
  if (tiles > int64_t(INT32_MAX)) throw std::invalid_argument("gradiveq CUDA projection: too many tiles");
  table.tile_start[count] = int32_t(tiles);
  return table;
}

template <typename Acc, typename B, typename Out, bool kTransA, bool kTransB>
void launch(const JobTable& table, cudaStream_t stream) {
  const int tiles = table.tile_start[table.count];
  if (tiles == 0) return;
  grouped_gemm<Acc, B, Out, kTransA, kTransB><<<tiles, kThreads, 0, stream>>>(table);
  check_launch("grouped projection");
  int64_t largest_split_output = 0;
  for (int i = 0; i < table.count; ++i) {
    const GemmJob& job = table.jobs[i];
    if (job.splits > 1) largest_split_output = std::max(largest_split_output, job.rows * job.cols);
  }
  if constexpr (std::is_same_v<Acc, float>) {
    if (largest_split_output == 0) return;
    const dim3 grid(unsigned((largest_split_output + kThreads - 1) / kThreads), unsigned(table.count));
    reduce_splits<Out><<<grid, kThreads, 0, stream>>>(table);
    check_launch("grouped projection, split reduction");
  }
}

template <typename B, bool kTransB>
void launch_out(const JobTable& table, Dtype out_dtype, cudaStream_t stream) {
  switch (out_dtype) {
    case Dtype::kBFloat16:
      return launch<float, B, __nv_bfloat16, false, kTransB>(table, stream);
    case Dtype::kFloat16:
      return launch<float, B, __half, false, kTransB>(table, stream);
    case Dtype::kFloat32:
      return launch<float, B, float, false, kTransB>(table, stream);
    default:
      throw std::invalid_argument("gradiveq CUDA projection: out must be float32, bfloat16 or float16");
  }
}

template <bool kTransB>
void launch_b(const JobTable& table, Dtype b_dtype, Dtype out_dtype, cudaStream_t stream) {
  switch (b_dtype) {
    case Dtype::kBFloat16:
      return launch_out<__nv_bfloat16, kTransB>(table, out_dtype, stream);
    case Dtype::kFloat16:
      return launch_out<__half, kTransB>(table, out_dtype, stream);
    case Dtype::kFloat32:
      return launch_out<float, kTransB>(table, out_dtype, stream);
    default:
      throw std::invalid_argument("gradiveq CUDA projection: the basis must be float32, bfloat16 or float16");
  }
}

}  // namespace

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("gradiveq CUDA kernel '") + what +
                             "' failed to launch: " + cudaGetErrorString(err));
  }
}

int32_t inner_splits(const GemmJob& job) {
  // Enough blocks to fill a large GPU (132 SMs on an H100 / H200, several blocks each), each still summing at
  // least 512 inner elements; the float32 partials cost splits x rows x cols floats, small for the short
  // products that need them.
  constexpr int64_t kTargetBlocks = 512, kMinChunk = 512;
  const int64_t tiles = output_tiles(job);
  if (tiles >= kTargetBlocks || job.inner < 2 * kMinChunk) return 1;
  return int32_t(std::min<int64_t>((kTargetBlocks + tiles - 1) / tiles, job.inner / kMinChunk));
}

int64_t partial_floats(const GemmJob& job) {
  return job.splits > 1 ? int64_t(job.splits) * job.rows * job.cols : 0;
}

void launch_projection(const GemmJob* jobs, int count, bool transpose_b, Dtype b_dtype, Dtype out_dtype,
                       cudaStream_t stream) {
  const JobTable table = make_table(jobs, count);
  if (transpose_b) {
    launch_b<true>(table, b_dtype, out_dtype, stream);
  } else {
    launch_b<false>(table, b_dtype, out_dtype, stream);
  }
}

void launch_moments(const GemmJob& job, bool transpose_a, cudaStream_t stream) {
  const JobTable table = make_table(&job, 1);
  if (transpose_a) {
    launch<double, float, double, true, false>(table, stream);
  } else {
    launch<double, float, double, false, true>(table, stream);
  }
}

}  // namespace gradiveq::detail::cuda
