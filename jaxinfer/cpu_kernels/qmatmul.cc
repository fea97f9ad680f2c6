// Quantized matmul on the CPU, an XLA FFI handler: y[M, N] = x[M, K] @ dequantize(W)^T.
//
// W is held as jaxinfer.quant stores it: rows [N, ...] with blocks of 32 along K, each block a scale (and a min):
//   q8_0          values int8 [N, K], scales f16 [N, K/32]                  w = d * q
//   q4_0          values uint8 [N, K/2] nibbles, scales f16 [N, K/32]      w = d * (q - 8)
//   int4_g32_min  nibbles as q4_0, scales and mins f16 [N, K/32]           w = d * q + m   (GGUF Q4_1)
// Nibbles in ggml's order: in each block's 16 bytes, byte j holds code j (low nibble) and code j + 16 (high).
//
// Every layout is "codes times a block scale, plus a block min" (q4_0's min is -8 d, q8_0's is 0), so one dot serves
// all: x is quantized per block of 32 to int8 or int16 (x ~ dx * qx, llama.cpp's Q8_1 idea), and for each (row, block)
//   sum_i w_i x_i = d * dx * sum_i q_i qx_i  +  m * (dx * sum_i qx_i)
// an integer dot of the codes, a scale per block, and the min against the block sum precomputed with x.
// The arithmetic (Dot): int8 activations (maddubs: the fastest, llama.cpp's rounding), int16 (madd: a step of
// max|x| / 32767 per block, 256 times finer, about int8's speed at M = 1), or float (x as it is, a panel of W
// dequantized in cache: exact up to the order of the sums).
// A layout with groups of 64 or 128 reads the same scale for 2 or 4 blocks (ScaleIndex), int8_channel one per row;
// the K-quants compute d and m from their sub-block scales where MinOf and the block loads stand.
//
// Paths: a portable scalar loop (the reference the SIMD paths are tested against), AVX2 (maddubs) and AVX-512 VL
// VNNI (dpbusd on 256-bit lanes), both compiled from qmatmul_x86.inc under `#pragma GCC target` and picked at run
// time, so one build runs on any x86-64 and compiles elsewhere with the scalar path alone. In the SIMD paths, M = 1
// streams one weight row at a time with a prefetch ahead; M > 1 runs register tiles of 2 weight rows x 4 x rows
// (nibble layouts two blocks per 32-byte load, x's codes laid out to match); float activations dequantize a panel
// of rows that stays in cache and run an sgemm tile of 3 x 4 over it.
// Threads: XLA's intra-op pool; row chunks are claimed through an atomic counter by the calling thread and helper
// tasks alike, and the caller waits only for chunks already claimed (never for a task that has not started: the
// handler may itself run on a pool worker).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#define QMM_X86 1
#include <immintrin.h>
#else
#define QMM_X86 0
#endif

namespace ffi = xla::ffi;

namespace qmm {

constexpr int64_t kBlock = 32;

enum class Layout { kQ8_0, kQ4_0, kQ4_1 };

// How a chunk of rows is computed: integer block dots against x's int8 or int16 codes, or float dots against x.
enum class Dot { kInt8, kInt16, kFloat };

// The values of the `isa` attribute (and of jaxinfer_cpu_kernels_best_isa): 0 picks the best the CPU has.
enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

// W in storage order: row n's block b has codes at values + n * row_bytes + b * block_bytes and its scale at
// scales[n * blocks + b]. (A layout with a scale per 64 or 128 will index it with a compile-time shift of b, one per
// row with none: a run-time division per block cost more than the block's dot.)
struct Weights {
  Layout layout;
  const uint8_t* values;   // [N, K] int8 (q8_0) or [N, K/2] nibbles
  const uint16_t* scales;  // [N, K/32] f16
  const uint16_t* mins;    // [N, K/32] f16 (int4_g32_min), else null
  int64_t n, k, blocks;    // blocks = K / 32
  int64_t row_bytes, block_bytes;
};

// x quantized per block of 32: x[m, b * 32 + i] ~ d[m, b] * q[m, b * 32 + i] (q int8, or q16 int16).
struct Activations {
  const float* f;   // [M, K] the float activations (the float path)
  const int8_t* q;  // [M, K] (Dot::kInt8)
  const int16_t* q16;  // [M, K] (Dot::kInt16)
  const float* d;   // [M, K/32]
  const float* s;   // [M, K/32] d * sum_i q: the block sum the min multiplies
  const float* s_by_block;  // [K/32, m_padded] the same, x rows adjacent (zeros past M): 4 rows load as one vector
  // Nibble layouts: x's codes per pair of blocks (b, b + 1) in the lanes a 32-byte load of their nibbles puts them,
  // [b 0..15 | b+1 0..15 | b 16..31 | b+1 16..31], and their scales [d_b x 4 | d_b+1 x 4]; an odd last block is not
  // paired (x.q holds it).
  const int8_t* q_pairs;  // [M, K] or null
  const float* d_pairs;   // [M, K/32 * 4] or null
  // int16 codes per pair of blocks as 16-bit lanes of a 32-byte load of their nibbles put them (PairBlocks16).
  const int16_t* q16_pairs;  // [M, K] or null
  int64_t m, k, blocks, m_padded;
};

// One x row's int8 codes laid out per pair of blocks (Activations::q_pairs).
inline void PairBlocks(const int8_t* q, int64_t blocks, int8_t* q_pairs) {
  for (int64_t b = 0; b + 2 <= blocks; b += 2) {
    int8_t* out = q_pairs + b * kBlock;  // 64 bytes per pair
    const int8_t* first = q + b * kBlock;
    const int8_t* second = first + kBlock;
    std::memcpy(out, first, 16);
    std::memcpy(out + 16, second, 16);
    std::memcpy(out + 32, first + 16, 16);
    std::memcpy(out + 48, second + 16, 16);
  }
}

// One x row's block scales per pair of blocks: [d_b x 4 | d_b+1 x 4], the lanes of a pair's int32 dot.
inline void PairScales(const float* d, int64_t blocks, float* d_pairs) {
  for (int64_t b = 0; b + 2 <= blocks; b += 2) {
    for (int i = 0; i < 4; ++i) {
      d_pairs[b * 4 + i] = d[b];
      d_pairs[b * 4 + 4 + i] = d[b + 1];
    }
  }
}

// One x row's int16 codes per pair of blocks (b, b + 1) in the order the 16-bit lanes of a 32-byte load of their
// nibbles give them: lane j of half h holds byte 2j of block b + h, whose low and high nibbles are codes 2j and
// 2j + 16, the next byte's 2j + 1 and 2j + 17; so 4 x [16] lanes: codes 2j, 2j + 16, 2j + 1, 2j + 17 (j < 8) of
// blocks b then b + 1.
inline void PairBlocks16(const int16_t* q, int64_t blocks, int16_t* q_pairs) {
  constexpr int kOffsets[4] = {0, 16, 1, 17};
  for (int64_t b = 0; b + 2 <= blocks; b += 2) {
    int16_t* out = q_pairs + b * kBlock;  // 64 codes per pair
    for (int part = 0; part < 4; ++part) {
      for (int half = 0; half < 2; ++half) {
        for (int j = 0; j < 8; ++j) out[part * 16 + half * 8 + j] = q[(b + half) * kBlock + 2 * j + kOffsets[part]];
      }
    }
  }
}

// float16 bits -> float32, portable (the SIMD paths use F16C).
inline float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0) {
    float subnormal = static_cast<float>(mantissa) * (1.0f / 16777216.0f);  // mantissa * 2^-24
    return sign ? -subnormal : subnormal;
  }
  if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest, ties to even (jnp.round's rule) without a libm call: exact for |v| < 2^22.
inline float RoundHalfEven(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23; without -ffast-math the compiler keeps (v + magic) - magic
  return (v + magic) - magic;
}

// One row of x [K] -> codes [K] (int8 or int16), scales and block sums [K/32]: d = max|x| / Q, q = round(x * (1 / d))
// with Q = 127 or 32767.
template <typename Code>
inline void QuantizeRow(const float* x, int64_t k, Code* q, float* d, float* s) {
  constexpr float kMax = std::numeric_limits<Code>::max();
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    float scale = amax / kMax;
    float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      float r = std::min(kMax, std::max(-kMax, RoundHalfEven(xb[i] * inverse)));
      q[b * kBlock + i] = static_cast<Code>(r);
      sum += static_cast<int32_t>(r);
    }
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
  }
}

inline int64_t ScaleIndex(const Weights& w, int64_t n, int64_t b) { return n * w.blocks + b; }

// The block's min m (w = d * q + m), given its scale d.
inline float MinOf(const Weights& w, int64_t n, int64_t b, float d) {
  switch (w.layout) {
    case Layout::kQ8_0: return 0.0f;
    case Layout::kQ4_0: return -8.0f * d;
    case Layout::kQ4_1: return HalfToFloat(w.mins[ScaleIndex(w, n, b)]);
  }
  return 0.0f;
}

// ------------------------------------------------------------------------------------------------------------------
// The scalar path: the reference of the SIMD paths, and the fallback on any CPU.

// Codes of row n's block b -> [32] ints: q8_0's signed codes, the nibbles' 0..15 (the min carries q4_0's -8).
inline void BlockCodes(const Weights& w, int64_t n, int64_t b, int32_t* codes) {
  const uint8_t* p = w.values + n * w.row_bytes + b * w.block_bytes;
  if (w.layout == Layout::kQ8_0) {
    for (int i = 0; i < kBlock; ++i) codes[i] = static_cast<int8_t>(p[i]);
    return;
  }
  for (int j = 0; j < kBlock / 2; ++j) {
    codes[j] = p[j] & 15;
    codes[j + kBlock / 2] = p[j] >> 4;
  }
}

// y[m, n] for m in [0, M), n in [n_begin, n_end): integer block dots against the int8 (Code int8_t: x.q) or int16
// (int16_t: x.q16) activations.
template <typename Code>
void RowsScalar(const Weights& w, const Activations& x, int64_t n_begin, int64_t n_end, float* y) {
  int32_t codes[kBlock];
  const Code* x_codes;
  if constexpr (sizeof(Code) == 1) {
    x_codes = x.q;
  } else {
    x_codes = x.q16;
  }
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < x.m; ++m) {
      float acc = 0.0f;
      for (int64_t b = 0; b < w.blocks; ++b) {
        BlockCodes(w, n, b, codes);
        const Code* xq = x_codes + m * x.k + b * kBlock;
        int32_t dot = 0;
        for (int i = 0; i < kBlock; ++i) dot += codes[i] * xq[i];
        float d = HalfToFloat(w.scales[ScaleIndex(w, n, b)]);
        acc += d * x.d[m * x.blocks + b] * static_cast<float>(dot) + MinOf(w, n, b, d) * x.s[m * x.blocks + b];
      }
      y[m * w.n + n] = acc;
    }
  }
}

// The same against the float activations: each weight block dequantized, then a float dot.
void RowsScalarFloat(const Weights& w, const Activations& x, int64_t n_begin, int64_t n_end, float* y) {
  int32_t codes[kBlock];
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < x.m; ++m) {
      float acc = 0.0f;
      for (int64_t b = 0; b < w.blocks; ++b) {
        BlockCodes(w, n, b, codes);
        float d = HalfToFloat(w.scales[ScaleIndex(w, n, b)]), low = MinOf(w, n, b, d);
        const float* xf = x.f + m * x.k + b * kBlock;
        for (int i = 0; i < kBlock; ++i) acc += (d * static_cast<float>(codes[i]) + low) * xf[i];
      }
      y[m * w.n + n] = acc;
    }
  }
}

}  // namespace qmm

// ------------------------------------------------------------------------------------------------------------------
// The x86 SIMD paths: one body, compiled once per instruction set.

#if QMM_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define QMM_NS avx2
#define QMM_VNNI 0
#include "qmatmul_x86.inc"
#undef QMM_NS
#undef QMM_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define QMM_NS avx512
#define QMM_VNNI 1
#include "qmatmul_x86.inc"
#undef QMM_NS
#undef QMM_VNNI
#pragma GCC pop_options
#endif

namespace qmm {

int64_t DetectIsa() {
#if QMM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return kAvx2;
  }
#endif
  return kScalar;
}

// The best instruction set of this CPU, asked once.
int64_t BestIsa() {
  static const int64_t best = DetectIsa();
  return best;
}

// y rows [n_begin, n_end) for every x row, on the path `isa` (one the CPU has).
void RunRows(int64_t isa, Dot dot, const Weights& w, const Activations& x, int64_t n_begin, int64_t n_end, float* y) {
#if QMM_X86
  if (isa == kAvx512) return avx512::Rows(w, x, dot, n_begin, n_end, y);
  if (isa == kAvx2) return avx2::Rows(w, x, dot, n_begin, n_end, y);
#endif
  switch (dot) {
    case Dot::kFloat: return RowsScalarFloat(w, x, n_begin, n_end, y);
    case Dot::kInt16: return RowsScalar<int16_t>(w, x, n_begin, n_end, y);
    case Dot::kInt8: return RowsScalar<int8_t>(w, x, n_begin, n_end, y);
  }
}

using jaxinfer_cpu::ParallelFor;
using jaxinfer_cpu::UsableThreads;

constexpr int64_t kLeastChunkBytes = 16384;

// Rows per chunk: enough chunks to balance the threads; each worth at least ~16 KB of weights streamed per x row (a
// couple of microseconds: a spinning helper joins in well under one, parallel_for.h); few enough rows that a chunk's
// weights stay in cache while every x row passes over them (M > 1; the float path holds them dequantized).
int64_t RowsPerChunk(const Weights& w, int64_t m, Dot dot, int64_t threads) {
  const bool float_activations = dot == Dot::kFloat;
  const int64_t stored_row = w.row_bytes + 2 * w.blocks * (w.mins ? 2 : 1);
  const int64_t cached_row = float_activations ? 4 * w.k : stored_row;
  const int64_t cache_bytes = m == 1 ? (int64_t{1} << 30) : float_activations ? 196608 : 65536;
  int64_t cache_rows = std::max<int64_t>(1, cache_bytes / cached_row);
  int64_t least_rows = std::max<int64_t>(1, kLeastChunkBytes / (stored_row * m));
  int64_t balance_rows = std::max<int64_t>(1, (w.n + 4 * threads - 1) / (4 * threads));
  int64_t rows = std::min(cache_rows, std::max(least_rows, balance_rows));
  return m == 1 ? rows : (rows + 3) / 4 * 4;  // whole tiles of rows
}

// One x row's codes, scales and block sums (QuantizeRow), with the SIMD version where `isa` has one (the same bits).
template <typename Code>
void QuantizeX(int64_t isa, const float* x, int64_t k, Code* q, float* d, float* s) {
#if QMM_X86
  if (isa >= kAvx2) return avx2::QuantizeRowSimd(x, k, q, d, s);
#endif
  QuantizeRow(x, k, q, d, s);
}

void PairX16(int64_t isa, const int16_t* q, int64_t blocks, int16_t* q_pairs) {
#if QMM_X86
  if (isa >= kAvx2) return avx2::PairBlocks16Simd(q, blocks, q_pairs);
#endif
  PairBlocks16(q, blocks, q_pairs);
}

// One weight and where its product goes: y [M, w.n].
struct Product {
  Weights w;
  float* y;
};

// x [M, K] against one or more weights of one layout and K (a layer's q, k and v): quantize x once (8 or 16 bits;
// 32: as it is), then every weight's row chunks in parallel, together.
void Matmul(ffi::ThreadPool& pool, int64_t threads, int64_t isa, int64_t activation_bits,
            const Product* products, int64_t count, const float* x_data, int64_t m) {
  const Weights& w = products[0].w;  // the layout, K and blocks every product shares
  const Dot dot = activation_bits == 8 ? Dot::kInt8 : activation_bits == 16 ? Dot::kInt16 : Dot::kFloat;
  const int64_t m_padded = (m + 3) / 4 * 4, blocks = dot == Dot::kFloat ? 0 : w.blocks;
  // This thread's buffers, reused from call to call (decode makes hundreds of small calls a token).
  thread_local std::vector<int8_t> codes, q_pairs;
  thread_local std::vector<int16_t> codes16, q16_pairs;
  thread_local std::vector<float> scales, sums, sums_by_block, d_pairs;
  codes.resize(dot == Dot::kInt8 ? blocks * kBlock * m : 0);
  codes16.resize(dot == Dot::kInt8 ? 0 : blocks * kBlock * m);
  scales.resize(blocks * m);
  sums.resize(blocks * m);
  sums_by_block.assign(blocks * m_padded, 0.0f);
  for (int64_t i = 0; i < m && blocks; ++i) {
    float* d = scales.data() + i * w.blocks;
    float* s = sums.data() + i * w.blocks;
    if (dot == Dot::kInt8) {
      QuantizeX(isa, x_data + i * w.k, w.k, codes.data() + i * w.k, d, s);
    } else {
      QuantizeX(isa, x_data + i * w.k, w.k, codes16.data() + i * w.k, d, s);
    }
    for (int64_t b = 0; b < w.blocks; ++b) sums_by_block[b * m_padded + i] = s[b];
  }
  const bool pairs = dot != Dot::kFloat && w.layout != Layout::kQ8_0;
  q_pairs.resize(pairs && dot == Dot::kInt8 ? m * w.k : 0);
  q16_pairs.resize(pairs && dot == Dot::kInt16 ? m * w.k : 0);
  d_pairs.resize(pairs ? m * w.blocks * 4 : 0);
  for (int64_t i = 0; i < m && pairs; ++i) {
    PairScales(scales.data() + i * w.blocks, w.blocks, d_pairs.data() + i * w.blocks * 4);
    if (dot == Dot::kInt8) {
      PairBlocks(codes.data() + i * w.k, w.blocks, q_pairs.data() + i * w.k);
    } else {
      PairX16(isa, codes16.data() + i * w.k, w.blocks, q16_pairs.data() + i * w.k);
    }
  }
  Activations x{x_data, codes.data(), codes16.data(), scales.data(), sums.data(),
                sums_by_block.data(), q_pairs.data(), d_pairs.data(), q16_pairs.data(), m, w.k, w.blocks, m_padded};
  struct Chunk {
    const Product* product;
    int64_t begin, end;
  };
  thread_local std::vector<Chunk> chunks;
  chunks.clear();
  for (const Product* p = products; p < products + count; ++p) {
    int64_t rows = RowsPerChunk(p->w, m, dot, threads);
    for (int64_t n = 0; n < p->w.n; n += rows) chunks.push_back({p, n, std::min(p->w.n, n + rows)});
  }
  const Chunk* list = chunks.data();  // this thread's: a helper naming `chunks` would find its own, empty
  ParallelFor(pool, threads, static_cast<int64_t>(chunks.size()), [&, list](int64_t i) {
    const Chunk& c = list[i];
    RunRows(isa, dot, c.product->w, x, c.begin, c.end, c.product->y);
  });
}

// The `isa` (kAuto -> the best) and `activation_bits` attributes of a call: an error naming a value this CPU or the
// kernel cannot take, else nothing.
std::optional<ffi::Error> CheckIsaAndBits(const std::string& op, int64_t& isa, int64_t activation_bits) {
  const int64_t best = BestIsa();
  if (isa == kAuto) isa = best;
  if (isa < kScalar || isa > best) {
    return ffi::Error::InvalidArgument(op + ": isa " + std::to_string(isa) + " is not one this CPU has (best " +
                                       std::to_string(best) + ")");
  }
  if (activation_bits != 8 && activation_bits != 16 && activation_bits != 32) {
    return ffi::Error::InvalidArgument(op + ": activation_bits " + std::to_string(activation_bits) +
                                       " must be 8, 16 or 32");
  }
  return std::nullopt;
}

// The batch dims of one operand: size per dim (1: broadcast) over the output's batch dims.
struct Operand {
  ffi::Span<const int64_t> dims;
  int64_t own_dims;  // the trailing dims that are not batch: x [M, K], the parts [L, N, n], layer none

  int64_t BatchSize() const {
    int64_t size = 1;
    for (size_t i = 0; i + own_dims < dims.size(); ++i) size *= dims[i];
    return size;
  }
  // The flat batch index of this operand for the output's batch multi-index (a broadcast dim contributes 0).
  int64_t Offset(ffi::Span<const int64_t> batch, int64_t flat) const {
    int64_t offset = 0, stride = 1;
    for (int64_t i = static_cast<int64_t>(batch.size()) - 1; i >= 0; --i) {
      int64_t index = flat % batch[i];
      flat /= batch[i];
      if (dims[i] != 1) offset += index * stride;
      stride *= dims[i];
    }
    return offset;
  }
};

std::string Shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// A part [*B, L, N, n] has the expected L, N and n (and rank).
bool PartFits(ffi::Span<const int64_t> dims, size_t rank, int64_t layers, int64_t n, int64_t last) {
  return dims.size() == rank && dims[rank - 3] == layers && dims[rank - 2] == n && dims[rank - 1] == last;
}

// x [*B, M, K] f32; layer [*B] int32; values [*B, L, N, K / codes per byte]; scales (mins) [*B, L, N, K/32] f16
// -> y [*B, M, N] f32, W the parts' layer `layer`. The whole stack of layers comes in and the kernel reads one: under
// lax.scan a slice of the stack passed to a custom call is copied first (3x the time of a 49152 x 576 q4_0 matvec).
// Each batch dim of an operand is the output's or 1 (vmap_method="expand_dims"); x's batch folds into M when W's
// and the layer's have none.
ffi::Error QMatmul(ffi::ThreadPool pool, Layout layout, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                   ffi::AnyBuffer values, ffi::Buffer<ffi::F16> scales, const ffi::Buffer<ffi::F16>* mins,
                   ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t isa, int64_t activation_bits) {
  auto out_dims = y->dimensions();
  const size_t rank = out_dims.size();
  if (rank < 2 || x.dimensions().size() != rank || layer.dimensions().size() != rank - 2 ||
      values.dimensions().size() != rank + 1) {
    return ffi::Error::InvalidArgument("qmatmul: x " + Shape(x.dimensions()) + ", layer " +
                                       Shape(layer.dimensions()) + ", values " + Shape(values.dimensions()) +
                                       " and y " + Shape(out_dims) + " have ranks that do not match");
  }
  const int64_t m = out_dims[rank - 2], n = out_dims[rank - 1], k = x.dimensions()[rank - 1];
  const int64_t layers = values.dimensions()[rank - 2], codes_per_byte = layout == Layout::kQ8_0 ? 1 : 2;
  if (k % kBlock != 0 || x.dimensions()[rank - 2] != m ||
      !PartFits(values.dimensions(), rank + 1, layers, n, k / codes_per_byte) ||
      !PartFits(scales.dimensions(), rank + 1, layers, n, k / kBlock) ||
      (mins && !PartFits(mins->dimensions(), rank + 1, layers, n, k / kBlock))) {
    return ffi::Error::InvalidArgument("qmatmul: shapes x " + Shape(x.dimensions()) + ", values " +
                                       Shape(values.dimensions()) + ", scales " + Shape(scales.dimensions()) +
                                       ", y " + Shape(out_dims) + " do not match");
  }
  if (std::optional<ffi::Error> bad = CheckIsaAndBits("qmatmul", isa, activation_bits)) return *bad;
  threads = UsableThreads(pool, threads);

  ffi::Span<const int64_t> batch(out_dims.begin(), rank - 2);
  Operand x_op{x.dimensions(), 2}, layer_op{layer.dimensions(), 0}, w_op{values.dimensions(), 3},
      s_op{scales.dimensions(), 3};
  Operand m_op = mins ? Operand{mins->dimensions(), 3} : s_op;
  int64_t batch_size = 1;
  for (int64_t d : batch) batch_size *= d;
  for (const Operand* op : {&x_op, &layer_op, &w_op, &s_op, &m_op}) {
    for (size_t i = 0; i < batch.size(); ++i) {
      if (op->dims[i] != batch[i] && op->dims[i] != 1) {
        return ffi::Error::InvalidArgument("qmatmul: batch dims of " + Shape(op->dims) + " do not broadcast to " +
                                           Shape(out_dims));
      }
    }
  }
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  // Batch element i's weights: the stack's layer `layer` of its batch entry, [N, ...] of each part.
  auto weights_of = [&](int64_t i) -> std::optional<Weights> {
    int64_t l = layer.typed_data()[layer_op.Offset(batch, i)];
    if (l < 0 || l >= layers) return std::nullopt;
    const int64_t blocks = k / kBlock, row_bytes = k / codes_per_byte;
    const auto* codes = static_cast<const uint8_t*>(values.untyped_data());
    return Weights{layout,
                   codes + (w_op.Offset(batch, i) * layers + l) * n * row_bytes,
                   scales.typed_data() + (s_op.Offset(batch, i) * layers + l) * n * blocks,
                   mins ? mins->typed_data() + (m_op.Offset(batch, i) * layers + l) * n * blocks : nullptr,
                   n, k, blocks, row_bytes, kBlock / codes_per_byte};
  };
  const bool one_weight = w_op.BatchSize() == 1 && s_op.BatchSize() == 1 && m_op.BatchSize() == 1 &&
                          layer_op.BatchSize() == 1 && x_op.BatchSize() == batch_size;
  for (int64_t i = 0; i < (one_weight ? 1 : batch_size); ++i) {
    std::optional<Weights> w = weights_of(i);
    if (!w) {
      int64_t l = layer.typed_data()[layer_op.Offset(batch, i)];
      return ffi::Error::InvalidArgument("qmatmul: layer " + std::to_string(l) + " is outside the stack's " +
                                         std::to_string(layers));
    }
    if (one_weight) {  // x's batch folds into M
      Product product{*w, y_data};
      Matmul(pool, threads, isa, activation_bits, &product, 1, x_data, batch_size * m);
    } else {
      Product product{*w, y_data + i * m * n};
      Matmul(pool, threads, isa, activation_bits, &product, 1, x_data + x_op.Offset(batch, i) * m * k, m);
    }
  }
  return ffi::Error::Success();
}

ffi::Error QMatmulQ8_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                       ffi::AnyBuffer values, ffi::Buffer<ffi::F16> scales, ffi::ResultBuffer<ffi::F32> y,
                       int64_t threads, int64_t isa, int64_t activation_bits) {
  if (values.element_type() != ffi::DataType::S8) return ffi::Error::InvalidArgument("q8_0: values must be int8");
  return QMatmul(pool, Layout::kQ8_0, x, layer, values, scales, nullptr, y, threads, isa, activation_bits);
}

ffi::Error QMatmulQ4_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                       ffi::AnyBuffer values, ffi::Buffer<ffi::F16> scales, ffi::ResultBuffer<ffi::F32> y,
                       int64_t threads, int64_t isa, int64_t activation_bits) {
  if (values.element_type() != ffi::DataType::U8) return ffi::Error::InvalidArgument("q4_0: values must be uint8");
  return QMatmul(pool, Layout::kQ4_0, x, layer, values, scales, nullptr, y, threads, isa, activation_bits);
}

ffi::Error QMatmulQ4_1(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                       ffi::AnyBuffer values, ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> mins,
                       ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t isa, int64_t activation_bits) {
  if (values.element_type() != ffi::DataType::U8) {
    return ffi::Error::InvalidArgument("int4_g32_min: values must be uint8");
  }
  return QMatmul(pool, Layout::kQ4_1, x, layer, values, scales, &mins, y, threads, isa, activation_bits);
}

// x [M, K] f32 against several weights of one layout (a layer's q, k, v; its gate and up), each the layer `layer`
// ([] int32) of its stack: the remaining args are each weight's parts [L, N_j, n] in the layout's order (values,
// scales[, mins]), the results y_j [M, N_j] f32. One call: x quantized once, every weight's row chunks shared among
// the threads. (An unstacked weight comes as a stack of one: [1, N_j, n], layer 0.)
ffi::Error QMatmulMany(ffi::ThreadPool pool, Layout layout, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                       ffi::RemainingArgs parts, ffi::RemainingRets ys, int64_t threads, int64_t isa,
                       int64_t activation_bits) {
  const int64_t per_weight = layout == Layout::kQ4_1 ? 3 : 2, codes_per_byte = layout == Layout::kQ8_0 ? 1 : 2;
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2 || x_dims[1] % kBlock != 0 || layer.dimensions().size() != 0 || ys.size() == 0 ||
      parts.size() != ys.size() * static_cast<size_t>(per_weight)) {
    return ffi::Error::InvalidArgument("qmatmul_many: x " + Shape(x_dims) + " must be [M, K], K a multiple of 32, " +
                                       "layer " + Shape(layer.dimensions()) + " a scalar, with " +
                                       std::to_string(per_weight) + " parts per result (" +
                                       std::to_string(parts.size()) + " parts, " + std::to_string(ys.size()) +
                                       " results)");
  }
  if (std::optional<ffi::Error> bad = CheckIsaAndBits("qmatmul_many", isa, activation_bits)) return *bad;
  const int64_t m = x_dims[0], k = x_dims[1], blocks = k / kBlock, l = layer.typed_data()[0];
  const int64_t row_bytes = k / codes_per_byte;
  std::vector<Product> products;
  for (size_t j = 0; j < ys.size(); ++j) {
    auto values = parts.get<ffi::AnyBuffer>(j * per_weight);
    auto scales = parts.get<ffi::AnyBuffer>(j * per_weight + 1);
    auto y = ys.get<ffi::AnyBuffer>(j);
    if (!values.has_value() || !scales.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("qmatmul_many: weight " + std::to_string(j) + " could not be read");
    }
    std::optional<ffi::AnyBuffer> mins;
    if (per_weight == 3) {
      auto m_part = parts.get<ffi::AnyBuffer>(j * per_weight + 2);
      if (!m_part.has_value()) return ffi::Error::InvalidArgument("qmatmul_many: mins could not be read");
      mins = *m_part;
    }
    const auto v_dims = values->dimensions(), y_dims = (*y)->dimensions();
    const int64_t layers = v_dims.size() == 3 ? v_dims[0] : -1, n = v_dims.size() == 3 ? v_dims[1] : -1;
    const auto code_type = layout == Layout::kQ8_0 ? ffi::DataType::S8 : ffi::DataType::U8;
    auto fits = [&](const ffi::AnyBuffer& part, int64_t last) {
      return part.element_type() == ffi::DataType::F16 && PartFits(part.dimensions(), 3, layers, n, last);
    };
    if (n < 0 || values->element_type() != code_type || v_dims[2] != row_bytes || !fits(*scales, blocks) ||
        (mins && !fits(*mins, blocks)) || y_dims.size() != 2 || y_dims[0] != m || y_dims[1] != n) {
      return ffi::Error::InvalidArgument("qmatmul_many: weight " + std::to_string(j) + " values " + Shape(v_dims) +
                                         ", scales " + Shape(scales->dimensions()) + ", y " + Shape(y_dims) +
                                         " do not fit x " + Shape(x_dims));
    }
    if (l < 0 || l >= layers) {
      return ffi::Error::InvalidArgument("qmatmul_many: layer " + std::to_string(l) + " is outside the stack's " +
                                         std::to_string(layers));
    }
    const auto* codes = static_cast<const uint8_t*>(values->untyped_data()) + l * n * row_bytes;
    const auto* block_scales = static_cast<const uint16_t*>(scales->untyped_data()) + l * n * blocks;
    const auto* block_mins = mins ? static_cast<const uint16_t*>(mins->untyped_data()) + l * n * blocks : nullptr;
    products.push_back({Weights{layout, codes, block_scales, block_mins, n, k, blocks, row_bytes,
                                kBlock / codes_per_byte},
                        static_cast<float*>((*y)->untyped_data())});
  }
  if (m > 0) {
    Matmul(pool, UsableThreads(pool, threads), isa, activation_bits, products.data(),
           static_cast<int64_t>(products.size()), x.typed_data(), m);
  }
  return ffi::Error::Success();
}

ffi::Error QMatmulManyQ8_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                           ffi::RemainingArgs parts, ffi::RemainingRets ys, int64_t threads, int64_t isa,
                           int64_t activation_bits) {
  return QMatmulMany(pool, Layout::kQ8_0, x, layer, parts, ys, threads, isa, activation_bits);
}

ffi::Error QMatmulManyQ4_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                           ffi::RemainingArgs parts, ffi::RemainingRets ys, int64_t threads, int64_t isa,
                           int64_t activation_bits) {
  return QMatmulMany(pool, Layout::kQ4_0, x, layer, parts, ys, threads, isa, activation_bits);
}

ffi::Error QMatmulManyQ4_1(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                           ffi::RemainingArgs parts, ffi::RemainingRets ys, int64_t threads, int64_t isa,
                           int64_t activation_bits) {
  return QMatmulMany(pool, Layout::kQ4_1, x, layer, parts, ys, threads, isa, activation_bits);
}

}  // namespace qmm

extern "C" int64_t jaxinfer_cpu_kernels_best_isa() { return qmm::BestIsa(); }

#define QMM_BIND_COMMON                  \
  ffi::Ffi::Bind()                       \
      .Ctx<ffi::ThreadPool>()            \
      .Arg<ffi::Buffer<ffi::F32>>()      \
      .Arg<ffi::Buffer<ffi::S32>>()      \
      .Arg<ffi::AnyBuffer>()             \
      .Arg<ffi::Buffer<ffi::F16>>()

#define QMM_ATTRS                        \
  .Attr<int64_t>("threads")              \
      .Attr<int64_t>("isa")              \
      .Attr<int64_t>("activation_bits")

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_qmatmul_q8_0, qmm::QMatmulQ8_0,
                              QMM_BIND_COMMON.Ret<ffi::Buffer<ffi::F32>>() QMM_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_qmatmul_q4_0, qmm::QMatmulQ4_0,
                              QMM_BIND_COMMON.Ret<ffi::Buffer<ffi::F32>>() QMM_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_qmatmul_int4_g32_min, qmm::QMatmulQ4_1,
                              QMM_BIND_COMMON.Arg<ffi::Buffer<ffi::F16>>().Ret<ffi::Buffer<ffi::F32>>() QMM_ATTRS);

#define QMM_BIND_MANY                    \
  ffi::Ffi::Bind()                       \
      .Ctx<ffi::ThreadPool>()            \
      .Arg<ffi::Buffer<ffi::F32>>()      \
      .Arg<ffi::Buffer<ffi::S32>>()      \
      .RemainingArgs()                   \
      .RemainingRets()

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_qmatmul_many_q8_0, qmm::QMatmulManyQ8_0, QMM_BIND_MANY QMM_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_qmatmul_many_q4_0, qmm::QMatmulManyQ4_0, QMM_BIND_MANY QMM_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_qmatmul_many_int4_g32_min, qmm::QMatmulManyQ4_1, QMM_BIND_MANY QMM_ATTRS);
