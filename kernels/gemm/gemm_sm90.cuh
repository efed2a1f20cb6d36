// sm_90a GEMM: TMA (cp.async.bulk.tensor) loads into a multi-stage shared-memory ring guarded by
// mbarriers, one producer warpgroup and two consumer warpgroups issuing wgmma, persistent CTAs.
//
// Tile: BM = 128 rows of C, BN (128/192/256) columns, BK = 64 along K. Consumer warpgroup w owns
// rows [64w, 64w + 64) of the tile and holds its (64, BN) fp32 accumulator in registers.
// Shared-memory operand layouts (both 128-byte swizzled, as TMA writes them):
//   K-major  A tile: (BM, BK)  one box, row r at r*128 bytes          -> descriptor SBO = 1024
//   M-major  A tile: (BK, BM)  BM/64 boxes of (BK, 64), box at c*8192  -> LBO = 8192, SBO = 1024
//   K-major  B tile: (BN, BK)  one box                                 -> SBO = 1024
//   N-major  B tile: (BK, BN)  BN/64 boxes of (BK, 64)                 -> LBO = 8192, SBO = 1024
// Tails in M, N and K need no code: TMA zero-fills out-of-range box elements and the epilogue
// masks rows/columns beyond (M, N).
// Split-K: a work unit is (tile, split). Two ways to sum the splits:
//  - cluster (2..8 splits; the automatic choice considers it with TQ_GEMM_SM90_SPLIT_CLUSTER=1,
//    GemmParams::split_reduce forces it per call): the splits of a tile are the CTAs of one thread-block
//    cluster, one unit each. After the mainloop each CTA parks its fp32 (BM, BN) partial in its own
//    (now idle) stage ring; CTA r of the cluster then sums rows [r BM/S, (r+1) BM/S) of the tile
//    over the S partials through distributed shared memory, in split order (deterministic), and
//    applies the epilogue. No fp32 partials in global memory, no second launch.
//  - global: the raw fp32 sums go to a workspace (splits, M, N) and gemm_splitk_epilogue_kernel
//    applies the epilogue (more than 8 splits, or a device where the clusters cannot launch).
#pragma once

#include <cuda.h>  // CUtensorMap and the cuTensorMapEncodeTiled signature (resolved at run time)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include <kernels/bulk_async.cuh>
#include <kernels/cuda_check.cuh>
#include <kernels/gemm/gemm_common.cuh>
#include <kernels/gemm/wgmma_ops.cuh>

namespace tq::kernels::sm90 {

constexpr int kBM = 128;
constexpr int kBK = 64;
constexpr int kThreads = 384;  // warpgroup 0: producer; 1, 2: consumers
constexpr int kGroupM = 8;     // tiles of M walked together, so concurrent CTAs share B in L2

template <int BN>
struct Config {
  static constexpr int kABytes = kBM * kBK * 2;  // 16 KiB
  static constexpr int kBBytes = BN * kBK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kStages = BN == 192 ? 4 : BN == 256 ? 4 : 6;
  // Epilogue staging, 16 KiB per consumer warpgroup, right after the ring (1024-aligned):
  //  - TMA-store path: two (64, 64) bf16 buffers in the 128B-swizzle layout the store reads;
  //  - generic path: one (64, 64) fp32 chunk whose 16-byte column chunks of row r are
  //    XOR-swizzled by (r & 7) against bank conflicts.
  static constexpr int kStagePitch = 64;
  static constexpr int kEpiBytes = 2 * 64 * kStagePitch * 4;
  // + 1024 to align the ring to the 128B-swizzle atom, + barriers.
  static constexpr int kSmemBytes = kStages * kStageBytes + kEpiBytes + 1024 + 2 * kStages * 8;
  static_assert(kSmemBytes <= 232448, "over the sm_90 shared-memory limit");
  // Cluster split-K: the (BM, BN) fp32 partial in the stage ring, rows padded by 8 floats so that
  // the fragment stores (a warp: 8 rows x 32 bytes) take the minimum 2 wavefronts.
  static constexpr int kPartPitch = BN + 8;
  static_assert(kBM * kPartPitch * 4 <= kStages * kStageBytes, "the partial tile must fit the ring");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// 2-D tile load: box at coordinates (c0 innermost, c1) of the tensor map into shared memory.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// 2-D tile store from shared memory (bulk-group completion; out-of-range box elements are not
// written), and the bulk-group bookkeeping of the issuing thread.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1)
               : "memory");
}
using tq::cuda::bulk_commit;  // the bulk-group bookkeeping (kernels/bulk_async.cuh)
using tq::cuda::bulk_wait_all;
using tq::cuda::bulk_wait_read;
using tq::cuda::fence_proxy_async;
__device__ __forceinline__ void named_bar(int id) {
  asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory");
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
// Every thread of every CTA of the cluster arrives; the wait makes the others' shared-memory
// writes before their arrival visible (release / acquire).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}
// 16 bytes of CTA `rank`'s shared memory at the address `addr` has in this CTA.
__device__ __forceinline__ float4 ld_dsmem_f4(uint32_t addr, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(remote)
               : "memory");
  return v;
}
template <int R>
__device__ __forceinline__ void fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif

// Shared-memory matrix descriptor, 128-byte swizzle.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}

struct Schedule {
  int tiles_m, tiles_n, splits, k_blocks;
  int early_trigger;  // let the next programmatic dependent be scheduled at the start (else at exit)
  __device__ __forceinline__ int units() const { return tiles_m * tiles_n * splits; }
  // Unit -> (tile row, tile column, split, first and one-past-last k block).
  __device__ __forceinline__ void decode(int u, int& tm, int& tn, int& kb0, int& kb1) const {
    const int split = u % splits;
    const int t = u / splits;
    const int per_group = kGroupM * tiles_n;
    const int first_m = (t / per_group) * kGroupM;
    const int gsz = min(tiles_m - first_m, kGroupM);
    tm = first_m + (t % per_group) % gsz;
    tn = (t % per_group) / gsz;
    kb0 = split * k_blocks / splits;
    kb1 = (split + 1) * k_blocks / splits;
  }
};

template <int BN, bool kAMajorM, bool kBMajorN>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap tm_a,
                     const __grid_constant__ CUtensorMap tm_b,
                     const __grid_constant__ CUtensorMap tm_c, Epilogue epi,
                     float* __restrict__ ws, Schedule sched, int tma_c, int cluster_split) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Config<BN>;
  constexpr int S = Cfg::kStages;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  // ring: stage s = A tile at base + s*kStageBytes, B tile right after it; then the epilogue
  // staging (kEpiBytes, 1024-aligned since stages are multiples of 1 KiB); then the barriers
  const uint32_t epi_base = base + S * Cfg::kStageBytes;
  const uint32_t bars = epi_base + Cfg::kEpiBytes;  // full[S], then empty[S]
  float* epi_stage = reinterpret_cast<float*>(smem_raw + (epi_base - smem_addr(smem_raw)));
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (S + s); };

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 8);  // one arrive per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // As a programmatic dependent (gemm_pdl): the kernel before this one has completed from here on;
  // only the launch and the barrier set-up above overlap its tail.
  if (sched.early_trigger) tq::cuda::grid_dependents_launch();
  tq::cuda::grid_dependency_wait();

  const int units = sched.units();
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x == 0) {  // one thread issues every load
      int stage = 0;
      uint32_t phase = 0;
      for (int u = blockIdx.x; u < units; u += gridDim.x) {
        int tm, tn, kb0, kb1;
        sched.decode(u, tm, tn, kb0, kb1);
        for (int kb = kb0; kb < kb1; ++kb) {
          mbar_wait(empty(stage), phase ^ 1);
          mbar_expect_tx(full(stage), Cfg::kStageBytes);
          const uint32_t sa = base + stage * Cfg::kStageBytes;
          const uint32_t sb = sa + Cfg::kABytes;
          if constexpr (!kAMajorM) {
            tma_load_2d(sa, &tm_a, full(stage), kb * kBK, tm * kBM);  // box (BM, BK)
          } else {
#pragma unroll
            for (int c = 0; c < kBM / 64; ++c)  // boxes (BK, 64)
              tma_load_2d(sa + c * 8192, &tm_a, full(stage), tm * kBM + c * 64, kb * kBK);
          }
          if constexpr (!kBMajorN) {
            tma_load_2d(sb, &tm_b, full(stage), kb * kBK, tn * BN);  // box (BN, BK)
          } else {
#pragma unroll
            for (int c = 0; c < BN / 64; ++c)  // boxes (BK, 64)
              tma_load_2d(sb + c * 8192, &tm_b, full(stage), tn * BN + c * 64, kb * kBK);
          }
          if (++stage == S) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
    if (cluster_split) {  // the cluster barriers count every thread of every CTA (see the consumers)
      cluster_sync();
      cluster_sync();
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int cw = wg - 1;  // consumer warpgroup: rows [64cw, 64cw + 64) of the tile
    const int t = threadIdx.x % 128;
    const int warp = t / 32, lane = t % 32;
    int stage = 0;
    uint32_t phase = 0;
    uint32_t chunk = 0;  // TMA-store chunks issued by this warpgroup (selects the buffer)
    float acc[BN / 2];  // (64, BN) fp32 fragment of this warpgroup
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
      int tm, tn, kb0, kb1;
      sched.decode(u, tm, tn, kb0, kb1);
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
      fence_operands(acc);
      int prev = -1;
      for (int kb = kb0; kb < kb1; ++kb) {
        mbar_wait(full(stage), phase);
        const uint32_t sa = base + stage * Cfg::kStageBytes + cw * 8192;
        const uint32_t sb = base + stage * Cfg::kStageBytes + Cfg::kABytes;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk) {
          const uint64_t da = kAMajorM ? make_desc(sa + kk * 2048, 8192, 1024)
                                       : make_desc(sa + kk * 32, 16, 1024);
          const uint64_t db = kBMajorN ? make_desc(sb + kk * 2048, 8192, 1024)
                                       : make_desc(sb + kk * 32, 16, 1024);
          Wgmma<BN, kAMajorM ? 1 : 0, kBMajorN ? 1 : 0>::mma(acc, da, db, 1);
        }
        wgmma_commit();
        wgmma_wait<1>();  // the group of the previous k block is done: its stage can refill
        if (prev >= 0 && lane == 0) mbar_arrive(empty(prev));
        prev = stage;
        if (++stage == S) {
          stage = 0;
          phase ^= 1;
        }
      }
      wgmma_wait<0>();
      fence_operands(acc);
      if (prev >= 0 && lane == 0) mbar_arrive(empty(prev));

      if (cluster_split) {
        // One unit per CTA: the ring is idle once both consumer warpgroups are past the mainloop
        // (the producer has nothing more to load). Park the fp32 partial there, row-major.
        asm volatile("bar.sync 3, 256;" ::: "memory");
        float* part = reinterpret_cast<float*>(smem_raw + (base - smem_addr(smem_raw)));
        const int r = cw * 64 + warp * 16 + lane / 4;
#pragma unroll
        for (int q = 0; q < BN / 8; ++q) {
          const int c = 8 * q + 2 * (lane % 4);
          *reinterpret_cast<float2*>(part + r * Cfg::kPartPitch + c) = make_float2(acc[4 * q], acc[4 * q + 1]);
          *reinterpret_cast<float2*>(part + (r + 8) * Cfg::kPartPitch + c) =
              make_float2(acc[4 * q + 2], acc[4 * q + 3]);
        }
        cluster_sync();  // every split of the tile is parked
        // This CTA (cluster rank = split) sums rows [r0, r1) of the tile over the splits in split
        // order, two float4 per thread per round with all splits' loads in flight.
        const int splits = sched.splits, rank = u % splits;
        const int r0 = rank * kBM / splits, r1 = (rank + 1) * kBM / splits;
        constexpr int Q = BN / 4;  // float4 per partial row
        const int items = (r1 - r0) * Q, tc = threadIdx.x - 128;
#pragma unroll 1
        for (int i0 = tc; i0 < items; i0 += 2 * 256) {
          uint32_t off[2];
          int row[2], col[2];
          bool ok[2];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int i = i0 + 256 * j, rr = r0 + i / Q, c4 = i % Q;
            row[j] = tm * kBM + rr;
            col[j] = tn * BN + 4 * c4;
            ok[j] = i < items && row[j] < epi.M && col[j] < epi.N;
            off[j] = base + 4u * (rr * Cfg::kPartPitch + 4 * c4);
          }
          float4 v[8][2];
#pragma unroll
          for (int s = 0; s < 8; ++s)
#pragma unroll
            for (int j = 0; j < 2; ++j)
              if (s < splits && ok[j]) v[s][j] = ld_dsmem_f4(off[j], s);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            if (!ok[j]) continue;
            float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int s = 0; s < 8; ++s)
              if (s < splits) sum.x += v[s][j].x, sum.y += v[s][j].y, sum.z += v[s][j].z, sum.w += v[s][j].w;
            epi_store4(epi, row[j], col[j], sum);
          }
        }
        cluster_sync();  // no CTA leaves (or reuses its ring) while another still reads it
        continue;
      }

      // Accumulator fragment: acc[4q + {0,1}] at (r, c + {0,1}), acc[4q + {2,3}] at (r + 8, ...),
      // r = 16 warp + lane / 4, c = 8q + 2 (lane % 4).
      if constexpr (!kAMajorM && !kBMajorN) {  // the only layout of logits = h·Wᵀ (gemm() checks)
        if (epi.rs.stats != nullptr) {
          row_stats_fragment<BN>(acc, epi, tm * kBM + cw * 64 + warp * 16 + lane / 4, tn * BN, tn, lane);
          continue;
        }
      }
      if (tma_c) {
        // bf16 C, alpha only, no split: each 64-column chunk is scaled and rounded in registers,
        // written to one of this warpgroup's two (64, 64) bf16 buffers in the 128B-swizzle layout
        // (16-byte column chunk k of row r at k ^ (r & 7): the 8 rows of a warp store hit 32
        // distinct banks), and leaves through an asynchronous TMA store issued by one thread, so
        // the warpgroup goes on to the next tile while the copy engine writes C. A buffer is
        // rewritten only after the store that read it two chunks ago has finished reading.
        const int r = warp * 16 + lane / 4;
#pragma unroll
        for (int j = 0; j < BN / 64; ++j) {
          const uint32_t buf = epi_base + cw * 16384 + (chunk & 1) * 8192;
          if (t == 0) bulk_wait_read<1>();
          named_bar(1 + cw);
#pragma unroll
          for (int qq = 0; qq < 8; ++qq) {
            const int q = 8 * j + qq;
            const uint32_t off = buf + r * 128 + ((qq ^ (r & 7)) << 4) + 4 * (lane % 4);
            const __nv_bfloat162 lo = __floats2bfloat162_rn(acc[4 * q] * epi.alpha, acc[4 * q + 1] * epi.alpha);
            const __nv_bfloat162 hi =
                __floats2bfloat162_rn(acc[4 * q + 2] * epi.alpha, acc[4 * q + 3] * epi.alpha);
            st_shared_u32(off, *reinterpret_cast<const uint32_t*>(&lo));
            st_shared_u32(off + 8 * 128, *reinterpret_cast<const uint32_t*>(&hi));  // row r + 8
          }
          fence_proxy_async();  // generic-proxy writes -> visible to the copy engine
          named_bar(1 + cw);
          if (t == 0) {
            const int c0 = tn * BN + 64 * j, r0 = tm * kBM + cw * 64;
            if (c0 < epi.N && r0 < epi.M) tma_store_2d(&tm_c, buf, c0, r0);
            bulk_commit();  // possibly empty: one group per chunk keeps wait_read<1> exact
          }
          ++chunk;
        }
        continue;
      }
      // Generic epilogue (fp32 C, bias, beta, residual, split-K partials): each 64-column chunk
      // goes through shared memory as fp32 and leaves as whole row segments (a warp: 2 rows x 64
      // columns, 16 B/lane). The row loop stays rolled: its body inlines the whole epilogue.
      float* st = epi_stage + cw * 64 * Cfg::kStagePitch;  // (64, 64) chunk of this warpgroup
      const int split = u % sched.splits;
      float* ws_out = ws + static_cast<int64_t>(split) * epi.M * epi.N;  // (M, N) fp32 partials
      const int row0 = tm * kBM + cw * 64;
#pragma unroll
      for (int j = 0; j < BN / 64; ++j) {
        named_bar(1 + cw);  // previous chunk read out
#pragma unroll
        for (int q = 8 * j; q < 8 * j + 8; ++q) {
          const int rr = warp * 16 + lane / 4, cc = 8 * (q - 8 * j) + 2 * (lane % 4);
          const int sw = ((cc / 4) ^ (rr & 7)) * 4 + cc % 4;  // rows rr and rr + 8 swizzle alike
          *reinterpret_cast<float2*>(st + rr * Cfg::kStagePitch + sw) = make_float2(acc[4 * q], acc[4 * q + 1]);
          *reinterpret_cast<float2*>(st + (rr + 8) * Cfg::kStagePitch + sw) =
              make_float2(acc[4 * q + 2], acc[4 * q + 3]);
        }
        named_bar(1 + cw);
        const int col = tn * BN + 64 * j + 4 * (t % 16);
#pragma unroll 1
        for (int i = 0; i < 8; ++i) {
          const int rr = t / 16 + 8 * i;
          const float4 v =
              *reinterpret_cast<const float4*>(st + rr * Cfg::kStagePitch + 4 * ((t % 16) ^ (rr & 7)));
          const int row = row0 + rr;
          if (sched.splits == 1) {
            epi_store4(epi, row, col, v);
          } else if (row < epi.M) {
            float* dst = ws_out + static_cast<int64_t>(row) * epi.N + col;
            if (epi.N % 4 == 0 && col + 3 < epi.N) {
              *reinterpret_cast<float4*>(dst) = v;
            } else {
              const float vv[4] = {v.x, v.y, v.z, v.w};
              for (int c = 0; c < 4; ++c)
                if (col + c < epi.N) dst[c] = vv[c];
            }
          }
        }
      }
    }
    // The CTA's shared memory must outlive the reads of its last TMA stores.
    if (tma_c && t == 0) bulk_wait_all();
  }
#else
  __trap();
#endif
}

// ---- host side --------------------------------------------------------------------------------

// Resolved through the runtime so that no target has to link libcuda directly.
using EncodeTiledFn = decltype(&::cuTensorMapEncodeTiled);

inline EncodeTiledFn tensor_map_encoder() {
  static EncodeTiledFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    TQ_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                   cudaEnableDefault, &q));
    TQ_CHECK(p != nullptr && q == cudaDriverEntryPointSuccess,
             "gemm sm90: cuTensorMapEncodeTiled not found in the driver");
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

// Row-major bf16 matrix (rows, cols) with leading dimension ld, boxes of (box_rows, 64 columns).
inline CUtensorMap make_tensor_map(const void* ptr, int64_t rows, int64_t cols, int64_t ld,
                                   int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld * 2)};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr), dims, strides, box, estr,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TQ_CHECK(r == CUDA_SUCCESS, "gemm sm90: cuTensorMapEncodeTiled failed (", static_cast<int>(r),
           ") for rows=", rows, " cols=", cols, " ld=", ld);
  return map;
}

// TMA wants 16-byte aligned bases and leading dimensions.
inline bool operands_fit(const GemmParams& p) {
  auto al = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return al(p.A) && al(p.B) && p.lda % 8 == 0 && p.ldb % 8 == 0;
}

inline int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

// The TMA-store epilogue: bf16 C, 16-byte aligned with ldc % 8 == 0, and nothing to add
// (alpha is applied in registers). TQ_GEMM_SM90_TMA_C=0 turns it off (A/B comparisons).
inline bool c_store_fits(const GemmParams& p) {
  static const bool enabled = [] {
    const char* v = std::getenv("TQ_GEMM_SM90_TMA_C");
    return !(v && v[0] == '0');
  }();
  return enabled && p.c_dtype == GemmDType::bf16 && p.bias == nullptr && p.beta == 0.0f &&
         p.residual == nullptr && reinterpret_cast<uintptr_t>(p.C) % 16 == 0 && p.ldc % 8 == 0;
}

// Multiprocessor count of the current device, looked up once per device (host overhead matters
// for the small GEMMs, which take a few microseconds on the GPU).
inline int num_sms() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int dev = 0;
  TQ_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  int n = 0;
  TQ_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < kMaxDevices) cache[dev] = n;
  return n;
}

struct Choice {
  int bn, splits;
  bool cluster;  // splits summed through distributed shared memory (see the kernel)
};

constexpr int kMaxClusterSplits = 8;  // the portable cluster size

// Whether the automatic choice may pick the cluster split-K reduction: TQ_GEMM_SM90_SPLIT_CLUSTER=1.
// Off by default: measured on an H200 (tools/device_gemm_ab.sh, bench/RESULTS.md 2026-12-07) it lifts
// fwd 1136/2048/256 from 0.52 to 0.69 of cuBLAS but, picked as the cost model picks it, loses 3-4 us on
// the 1152-wide shapes (geometric mean 0.874 against 0.890). The GPU tests force it per call
// (GemmParams::split_reduce).
inline bool cluster_split_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("TQ_GEMM_SM90_SPLIT_CLUSTER");
    return v && v[0] == '1';
  }();
  return enabled;
}

template <int BN, bool AM, bool BN_MAJOR>
void set_smem_attribute() {
  static const bool done = [] {
    TQ_CUDA_CHECK(cudaFuncSetAttribute(gemm_sm90_kernel<BN, AM, BN_MAJOR>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, Config<BN>::kSmemBytes));
    return true;
  }();
  (void)done;
}

// Whether the GEMM kernel and its split-K epilogue are launched as programmatic dependents of the
// kernel before each (the kernel waits, griddepcontrol.wait, before its first global access; what
// overlaps the predecessor's tail is the launch and the CTAs' set-up). TQ_GEMM_PDL=0 turns it off
// (the A/B in bench/RESULTS.md). Read once.
inline bool gemm_pdl() {
  static const bool v = tq::cuda::env_switch_on("TQ_GEMM_PDL");
  return v;
}
// Whether a CTA lets the next programmatic dependent be scheduled as it starts (its CTAs then wait on
// the SMs this grid leaves idle) or, the default, only as it exits (the dependent's launch still
// overlaps this grid's completion and memory flush). Early (TQ_GEMM_PDL_TRIGGER=early) cost the
// single-wave 81-CTA shape M 1136, N 1152, K 4304 a third in three H100 runs (41 vs 26-28 us for
// fwd 1136/4304/1152; not profiled: a likely cause is that the next GEMM's CTAs, parked on the idle
// SMs, start there, so its SMs are no longer spread evenly over the GPCs). On the N/K = 256 shapes
// both trigger points gained about as much over the plain launch.
inline bool gemm_pdl_early_trigger() {
  static const bool v = [] {
    const char* e = std::getenv("TQ_GEMM_PDL_TRIGGER");
    return e && e[0] == 'e';
  }();
  return v;
}

// A launch of `grid` CTAs of the GEMM kernel, in clusters of `splits` along x when splits > 1, as a
// programmatic dependent when `programmatic`.
struct KernelLaunch {
  cudaLaunchAttribute attr[2] = {};
  cudaLaunchConfig_t cfg{};
  KernelLaunch(int64_t grid, int splits, size_t smem, cudaStream_t stream, bool programmatic) {
    unsigned n = 0;
    if (splits > 1) {
      attr[n].id = cudaLaunchAttributeClusterDimension;
      attr[n].val.clusterDim.x = static_cast<unsigned>(splits);
      attr[n].val.clusterDim.y = 1;
      attr[n].val.clusterDim.z = 1;
      ++n;
    }
    if (programmatic) attr[n++] = tq::cuda::programmatic_attribute();
    cfg.gridDim = dim3(static_cast<unsigned>(grid));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = n;
  }
  KernelLaunch(const KernelLaunch&) = delete;  // cfg points at attr
  KernelLaunch& operator=(const KernelLaunch&) = delete;
};

// How many clusters of `splits` CTAs of the BN-wide kernel the device runs at once (one CTA per
// SM, a cluster within one GPC); 0 where such clusters cannot launch.
template <int BN>
int query_cluster_capacity(int splits) {
  set_smem_attribute<BN, false, false>();
  const KernelLaunch launch(int64_t(splits) * 64, splits, Config<BN>::kSmemBytes, nullptr, false);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, gemm_sm90_kernel<BN, false, false>, &launch.cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it, and use the global split path
    n = 0;
  }
  return n;
}

// Cluster capacities of this device for every width and cluster size, looked up once per device
// (the cost model asks for them on every call; host time matters for the small GEMMs).
struct ClusterCaps {
  int n[3][kMaxClusterSplits + 1] = {};  // [bn 128 / 192 / 256][splits]
  int at(int bn, int splits) const {
    if (splits < 2 || splits > kMaxClusterSplits) return 0;
    return n[bn == 256 ? 2 : bn == 192 ? 1 : 0][splits];
  }
};

inline const ClusterCaps& cluster_caps() {
  constexpr int kMaxDevices = 64;
  static ClusterCaps caps[kMaxDevices];
  static bool known[kMaxDevices] = {};
  static const ClusterCaps none{};
  int dev = 0;
  TQ_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= kMaxDevices) return none;
  if (!known[dev]) {
    for (int s = 2; s <= kMaxClusterSplits; ++s) {
      caps[dev].n[0][s] = query_cluster_capacity<128>(s);
      caps[dev].n[1][s] = query_cluster_capacity<192>(s);
      caps[dev].n[2][s] = query_cluster_capacity<256>(s);
    }
    known[dev] = true;
  }
  return caps[dev];
}

// Refinement of a global split-K choice whose units form one partial wave (e.g. dw 4544/2048/256,
// the C (256, 2048) = dYᵀ·X of a 256-wide projection, K = 4544: 32 tiles x 3 splits = 96 of 132
// SMs): add splits while the units still fit one wave, each keeps >= 16 k blocks of mainloop and
// the fp32 partials stay L2-resident (<= 24 MB). Only M >= 256 with split-K already chosen is
// affected; small-M decoding shapes are memory-bound and keep the model's choice.
inline Choice fill_single_wave(Choice best, int M, int N, int K, int sms) {
  if (best.cluster || best.splits <= 1 || M < 2 * kBM) return best;
  const int kb = (K + kBK - 1) / kBK;
  const int64_t tiles = static_cast<int64_t>((M + kBM - 1) / kBM) * ((N + best.bn - 1) / best.bn);
  while (tiles * (best.splits + 1) <= sms && kb / (best.splits + 1) >= 16 &&
         4.0 * (best.splits + 1) * double(M) * N <= 24e6)
    ++best.splits;
  return best;
}

// Cost model: a CTA runs ceil(units / SMs) units of ceil(k_blocks / splits) k blocks each; a k
// block costs time proportional to its MACs (narrower tiles slightly less efficient); the whole
// call cannot beat reading A and B once and writing C (small M is memory-bound). Split-K adds
// either (global) a pass over (splits, M, N) fp32 partials and a launch, or (cluster, 2..8
// splits, when the device runs `capacity(bn, s)` >= tiles clusters at once) the exchange of one
// fp32 tile per CTA through distributed shared memory.
template <class Capacity>
Choice choose(int M, int N, int K, int sms, Capacity&& capacity) {
  const int kb = (K + kBK - 1) / kBK;
  const double flops_per_s_sm = 5.9e12, bytes_per_s = 3.2e12;
  const double t_mem = (2.0 * (double(M) * K + double(N) * K) + 2.0 * double(M) * N) / bytes_per_s;
  Choice best{256, 1, false};
  double best_t = 1e30;
  for (int bn : {256, 192, 128}) {
    const double eff = bn == 256 ? 1.0 : bn == 192 ? 0.96 : 0.90;
    const double t_kb = (2.0 * kBM * bn * kBK) / (flops_per_s_sm * eff);
    const int64_t tiles = static_cast<int64_t>((M + kBM - 1) / kBM) * ((N + bn - 1) / bn);
    for (int s = 1; s <= 16 && s <= kb; ++s) {
      if (s > 1 && kb / s < 4) break;
      const int kb_per = (kb + s - 1) / s;
      // Cluster split-K only where all of its clusters run at once: one unit per CTA gives up
      // the persistent kernel's overlap of a tile's epilogue with the next tile's loads.
      int cap = s > 1 ? capacity(bn, s) : 0;
      if (cap < tiles) cap = 0;
      double t;
      if (cap > 0) {
        // Cluster: units of one tile run together; the exchange reads (s-1)/s of a (BM, BN) fp32
        // tile per CTA (assumed ~200 GB/s per SM) between two cluster barriers.
        const double t_red = 0.5e-6 + kBM * bn * 4.0 * (s - 1) / s / 200e9;
        t = kb_per * t_kb + 1.0e-6 + t_red;
      } else {
        const int64_t waves = (tiles * s + sms - 1) / sms;
        t = waves * (kb_per * t_kb + 1.0e-6);
        // fp32 partials written and read back: measured on the H200 at about 1.9 TB/s effective
        // (M=1136, N=2048, K=16384: 4 splits cost ~40 us more than the model's mainloop saving).
        if (s > 1) t += (4.0 * s * M * N * 2.0) / 1.9e12 + 3.0e-6;
      }
      t = std::max(t, t_mem * (tiles * s < sms / 2 ? 2.0 : 1.0));  // few CTAs: less bandwidth
      if (t < best_t * 0.98) {
        best_t = t;
        best = {bn, s, cap > 0};
      }
    }
  }
  return fill_single_wave(best, M, N, K, sms);
}

template <int BN, bool AM, bool BN_MAJOR>
void launch_tile(const GemmParams& p, int splits, bool cluster, float* ws, int sms, cudaStream_t stream) {
  using Cfg = Config<BN>;
  auto kernel = gemm_sm90_kernel<BN, AM, BN_MAJOR>;
  set_smem_attribute<BN, AM, BN_MAJOR>();
  // A: K-major (M, K) box (128, 64) | M-major (K, M) box (64, 64)
  const CUtensorMap ma = AM ? make_tensor_map(p.A, p.K, p.M, p.lda, kBK)
                            : make_tensor_map(p.A, p.M, p.K, p.lda, kBM);
  // B: K-major (N, K) box (BN, 64) | N-major (K, N) box (64, 64)
  const CUtensorMap mb = BN_MAJOR ? make_tensor_map(p.B, p.K, p.N, p.ldb, kBK)
                                  : make_tensor_map(p.B, p.N, p.K, p.ldb, BN);
  // C through TMA stores when the epilogue is a plain scaled bf16 store (see the kernel).
  const bool tma_c = c_store_fits(p) && splits == 1 && p.row_stats.stats == nullptr;
  CUtensorMap mc{};
  if (tma_c) mc = make_tensor_map(p.C, p.M, p.N, p.ldc, 64);  // box (64, 64)
  Schedule sched{(p.M + kBM - 1) / kBM, (p.N + BN - 1) / BN, splits, (p.K + kBK - 1) / kBK,
                 gemm_pdl_early_trigger() ? 1 : 0};
  const int64_t units = static_cast<int64_t>(sched.tiles_m) * sched.tiles_n * splits;
  const Epilogue epi = make_epilogue(p);
  if (cluster) {
    // One unit per CTA, the splits of a tile in one cluster (cluster rank = split).
    TQ_CHECK(units < (int64_t(1) << 31), "gemm sm90: too many work units");
    const KernelLaunch launch(units, splits, Cfg::kSmemBytes, stream, gemm_pdl());
    TQ_CUDA_CHECK(cudaLaunchKernelEx(&launch.cfg, kernel, ma, mb, mc, epi, ws, sched, 0, 1));
    return;
  }
  const KernelLaunch launch(std::min<int64_t>(units, sms), 1, Cfg::kSmemBytes, stream, gemm_pdl());
  TQ_CUDA_CHECK(cudaLaunchKernelEx(&launch.cfg, kernel, ma, mb, mc, epi, ws, sched, tma_c ? 1 : 0, 0));
}

template <int BN>
void launch_bn(const GemmParams& p, int splits, bool cluster, float* ws, int sms, cudaStream_t stream) {
  const bool am = p.trans_a, bn_major = !p.trans_b;
  if (!am && !bn_major) launch_tile<BN, false, false>(p, splits, cluster, ws, sms, stream);
  else if (!am && bn_major) launch_tile<BN, false, true>(p, splits, cluster, ws, sms, stream);
  else if (am && !bn_major) launch_tile<BN, true, false>(p, splits, cluster, ws, sms, stream);
  else launch_tile<BN, true, true>(p, splits, cluster, ws, sms, stream);
}

inline void gemm_sm90(const GemmParams& p, cudaStream_t stream) {
  TQ_CHECK(operands_fit(p), "gemm sm90: A and B need 16-byte aligned bases and lda, ldb % 8 == 0");
  const int sms = num_sms();
  // The environment switch steers the automatic choice; a call that asks for one reduction gets it.
  const bool cluster_ok = p.split_reduce == GemmSplitReduce::cluster ||
                          (p.split_reduce == GemmSplitReduce::auto_select && cluster_split_enabled());
  static const ClusterCaps no_clusters{};
  const ClusterCaps& caps = cluster_ok ? cluster_caps() : no_clusters;  // no queries when not asked
  auto capacity = [&](int bn, int s) { return caps.at(bn, s); };
  Choice c = choose(p.M, p.N, p.K, sms, capacity);
  // Tuning knobs for benchmark sweeps (cost-model calibration): TQ_GEMM_SM90_TILE_N and
  // TQ_GEMM_SM90_SPLIT override the model where the call itself forces nothing.
  static const int env_bn = env_int("TQ_GEMM_SM90_TILE_N"), env_split = env_int("TQ_GEMM_SM90_SPLIT");
  if (p.tile_n) c.bn = p.tile_n;
  else if (env_bn) c.bn = env_bn;
  if (p.split_k) c.splits = std::min(p.split_k, (p.K + kBK - 1) / kBK);
  else if (env_split) c.splits = std::min(env_split, (p.K + kBK - 1) / kBK);
  TQ_CHECK(c.bn == 128 || c.bn == 192 || c.bn == 256, "gemm sm90: tile_n must be 128, 192 or 256");
  // A forced width or split count takes the cluster reduction wherever it can launch (the model's
  // own choice uses it only where every cluster runs at once).
  if (p.tile_n || env_bn || p.split_k || env_split) c.cluster = c.splits > 1 && capacity(c.bn, c.splits) > 0;
  TQ_CHECK(p.split_reduce != GemmSplitReduce::cluster || c.splits == 1 || c.cluster,
           "gemm sm90: the cluster split-K reduction cannot run ", c.splits, " splits of width ", c.bn,
           " here (2..", kMaxClusterSplits, " splits, cluster launch support)");
  const bool global_split = c.splits > 1 && !c.cluster;
  GemmScratch scratch(p, global_split ? sizeof(float) * c.splits * p.M * size_t(p.N) : 0, stream);
  float* ws = scratch.f32();
  switch (c.bn) {
    case 256: launch_bn<256>(p, c.splits, c.cluster, ws, sms, stream); break;
    case 192: launch_bn<192>(p, c.splits, c.cluster, ws, sms, stream); break;
    default: launch_bn<128>(p, c.splits, c.cluster, ws, sms, stream); break;
  }
  if (global_split) launch_splitk_epilogue(ws, c.splits, make_epilogue(p), stream, gemm_pdl());
}

}  // namespace tq::kernels::sm90
