// Float32 matmul on the CPU, an XLA FFI handler, for weights held in float32 (the F32 GGUF file, --quantize none):
// y[M, N] = x[M, K] W, W one layer of a stack [L, ...], in either orientation the model holds:
//   contract_first  W [K, N] (the projections, "BTD,DF->BTF"):        y[m, :] = sum_k x[m, k] W[k, :]
//   contract_last   W [N, K] (the tied head: the embedding [V, D]):  y[m, n] = x[m, :] . W[n, :]
// Decode (small M) is memory-bound: W is read once, in storage order, in chunks the threads claim. A contract_first
// chunk is a run of W's rows (a range of k) summed into a partial y of its own; the partials are then added in chunk
// order, so the bits do not depend on the threads. A contract_last chunk is a run of output rows.
// Why not XLA's dot: on the default model's F32 decode its matvecs read ~23 GB/s where llama.cpp's read ~28, and
// under lax.scan XLA copies each layer's weight slice out of the stack first; this reads the layer where it lies.
// Paths: a portable scalar loop and AVX2 + FMA, picked at run time.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#define FMM_X86 1
#include <immintrin.h>
#else
#define FMM_X86 0
#endif

namespace ffi = xla::ffi;

namespace fmm {

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2 };  // the `isa` attribute's values

int64_t BestIsa() {
#if FMM_X86
  static const int64_t best = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? kAvx2 : kScalar;
  }();
  return best;
#else
  return kScalar;
#endif
}

constexpr int64_t kRowChunks = 16;  // contract_first: how many runs of W's rows a call is cut into

struct Problem {
  const float* x;  // [M, K]
  const float* w;  // [K, N] (contract_first) or [N, K]: the layer's
  int64_t m, k, n;
};

// ---------------------------------------------------------------------------------------------- contract_first

// W's rows [k0, k1) against x's columns k0..k1 -> partial [M, N] (overwritten).
void RowsScalar(const Problem& p, int64_t k0, int64_t k1, float* partial) {
  std::fill(partial, partial + p.m * p.n, 0.0f);
  for (int64_t k = k0; k < k1; ++k) {
    const float* wk = p.w + k * p.n;
    for (int64_t i = 0; i < p.m; ++i) {
      const float xi = p.x[i * p.k + k];
      float* acc = partial + i * p.n;
      for (int64_t j = 0; j < p.n; ++j) acc[j] += xi * wk[j];
    }
  }
}

#if FMM_X86
// Four rows of W at a time: each partial vector is loaded and stored once for four FMAs; W is read in order. (One
// row at a time read 576x1536 10-15% slower, other shapes the same: 2026-12-03, 24-32 GB/s in a scan over 128 MB.)
__attribute__((target("avx2,fma"))) void RowsAvx2(const Problem& p, int64_t k0, int64_t k1, float* partial) {
  std::fill(partial, partial + p.m * p.n, 0.0f);
  const int64_t n8 = p.n / 8 * 8;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* w0 = p.w + k * p.n;
    const float *w1 = w0 + p.n, *w2 = w1 + p.n, *w3 = w2 + p.n;
    for (int64_t i = 0; i < p.m; ++i) {
      const float* xi = p.x + i * p.k + k;
      const __m256 x0 = _mm256_set1_ps(xi[0]), x1 = _mm256_set1_ps(xi[1]), x2 = _mm256_set1_ps(xi[2]),
                   x3 = _mm256_set1_ps(xi[3]);
      float* acc = partial + i * p.n;
      int64_t j = 0;
      for (; j < n8; j += 8) {
        __m256 a = _mm256_loadu_ps(acc + j);
        a = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + j), a);
        a = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + j), a);
        a = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w2 + j), a);
        a = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w3 + j), a);
        _mm256_storeu_ps(acc + j, a);
      }
      for (; j < p.n; ++j) acc[j] += xi[0] * w0[j] + xi[1] * w1[j] + xi[2] * w2[j] + xi[3] * w3[j];
    }
  }
  for (; k < k1; ++k) {
    const float* wk = p.w + k * p.n;
    for (int64_t i = 0; i < p.m; ++i) {
      const __m256 xk = _mm256_set1_ps(p.x[i * p.k + k]);
      float* acc = partial + i * p.n;
      int64_t j = 0;
      for (; j < n8; j += 8) {
        _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + j), _mm256_loadu_ps(acc + j)));
      }
      for (; j < p.n; ++j) acc[j] += p.x[i * p.k + k] * wk[j];
    }
  }
}
#endif

// y = the sum of the chunks' partials [chunks, M * N], in chunk order.
void AddPartials(const float* partials, int64_t chunks, int64_t size, float* y) {
  std::copy(partials, partials + size, y);
  for (int64_t c = 1; c < chunks; ++c) {
    const float* part = partials + c * size;
    for (int64_t j = 0; j < size; ++j) y[j] += part[j];
  }
}

// One or more contract_first products of one x (a layer's q, k and v; its gate and up), their chunks shared among
// the threads together: kRowChunks runs of each W's rows (at least 16 rows: the partials, and so the bits, do not
// depend on the threads), claimed as they come (a thread the host delays takes fewer).
void ContractFirst(ffi::ThreadPool& pool, int64_t threads, int64_t isa, const Problem* problems, float* const* ys,
                   int64_t count) {
  struct Chunk {
    const Problem* p;
    int64_t k0, k1;
    float* partial;  // [M, N] of its own
  };
  thread_local std::vector<Chunk> chunks;  // the calling thread's, reused from call to call
  thread_local std::vector<float> partials;
  chunks.clear();
  int64_t floats = 0;
  for (int64_t j = 0; j < count; ++j) {
    const Problem& p = problems[j];
    const int64_t rows = std::max<int64_t>(16, (p.k + kRowChunks - 1) / kRowChunks);
    floats += (p.k + rows - 1) / rows * p.m * p.n;
  }
  partials.resize(floats);
  float* next = partials.data();
  for (int64_t j = 0; j < count; ++j) {
    const Problem& p = problems[j];
    const int64_t rows = std::max<int64_t>(16, (p.k + kRowChunks - 1) / kRowChunks);
    for (int64_t k0 = 0; k0 < p.k; k0 += rows, next += p.m * p.n) {
      chunks.push_back({&p, k0, std::min(p.k, k0 + rows), next});
    }
  }
  const Chunk* list = chunks.data();  // this thread's: a helper naming `chunks` would find its own, empty
  jaxinfer_cpu::ParallelFor(pool, threads, static_cast<int64_t>(chunks.size()), [&, list](int64_t i) {
    const Chunk& c = list[i];
#if FMM_X86
    if (isa >= kAvx2) return RowsAvx2(*c.p, c.k0, c.k1, c.partial);
#endif
    RowsScalar(*c.p, c.k0, c.k1, c.partial);
  });
  const Chunk* c = list;
  for (int64_t j = 0; j < count; ++j) {  // each product's partials follow one another, in chunk order
    const int64_t size = problems[j].m * problems[j].n;
    int64_t n_chunks = 0;
    while (c + n_chunks < list + chunks.size() && c[n_chunks].p == &problems[j]) ++n_chunks;
    AddPartials(c->partial, n_chunks, size, ys[j]);
    c += n_chunks;
  }
}

// ---------------------------------------------------------------------------------------------- contract_last

// Output rows [n0, n1): y[i, n] = x[i, :] . W[n, :].
void DotsScalar(const Problem& p, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = p.w + n * p.k;
    for (int64_t i = 0; i < p.m; ++i) {
      const float* xi = p.x + i * p.k;
      float sum = 0.0f;
      for (int64_t j = 0; j < p.k; ++j) sum += xi[j] * wn[j];
      y[i * p.n + n] = sum;
    }
  }
}

#if FMM_X86
__attribute__((target("avx2,fma"))) inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four accumulators per dot (FMA latency), W's row read once for every row of x (M is small: x stays in cache).
__attribute__((target("avx2,fma"))) void DotsAvx2(const Problem& p, int64_t n0, int64_t n1, float* y) {
  const int64_t k32 = p.k / 32 * 32, k8 = p.k / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = p.w + n * p.k;
    for (int64_t i = 0; i < p.m; ++i) {
      const float* xi = p.x + i * p.k;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j < k32; j += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xi + j), _mm256_loadu_ps(wn + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xi + j + 8), _mm256_loadu_ps(wn + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xi + j + 16), _mm256_loadu_ps(wn + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xi + j + 24), _mm256_loadu_ps(wn + j + 24), a3);
      }
      for (; j < k8; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xi + j), _mm256_loadu_ps(wn + j), a0);
      float sum = Sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; j < p.k; ++j) sum += xi[j] * wn[j];
      y[i * p.n + n] = sum;
    }
  }
}
#endif

void ContractLast(ffi::ThreadPool& pool, int64_t threads, int64_t isa, const Problem& p, float* y) {
  const int64_t rows = std::max<int64_t>(16, std::min<int64_t>(256, (p.n + 4 * threads - 1) / (4 * threads)));
  const int64_t chunks = (p.n + rows - 1) / rows;
  jaxinfer_cpu::ParallelFor(pool, threads, chunks, [&](int64_t c) {
    const int64_t n0 = c * rows, n1 = std::min(p.n, n0 + rows);
#if FMM_X86
    if (isa >= kAvx2) return DotsAvx2(p, n0, n1, y);
#endif
    DotsScalar(p, n0, n1, y);
  });
}

std::string Shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// x [M, K]; layer [] int32; w [L, K, N] (contract_first 1) or [L, N, K] (0) -> y [M, N], W the stack's layer `layer`.
ffi::Error FMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                   ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t contract_first, int64_t threads,
                   int64_t isa) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions(), y_dims = y->dimensions();
  const bool shapes_fit = x_dims.size() == 2 && w_dims.size() == 3 && y_dims.size() == 2 &&
                          layer.dimensions().size() == 0 && y_dims[0] == x_dims[0] &&
                          w_dims[contract_first ? 1 : 2] == x_dims[1] && w_dims[contract_first ? 2 : 1] == y_dims[1];
  if (!shapes_fit) {
    return ffi::Error::InvalidArgument("fmatmul: x " + Shape(x_dims) + ", layer " + Shape(layer.dimensions()) +
                                       ", w " + Shape(w_dims) + " and y " + Shape(y_dims) + " do not fit (w [L, " +
                                       (contract_first ? "K, N" : "N, K") + "])");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= w_dims[0]) {
    return ffi::Error::InvalidArgument("fmatmul: layer " + std::to_string(l) + " is outside the stack's " +
                                       std::to_string(w_dims[0]));
  }
  const int64_t best = BestIsa();
  if (isa == kAuto) isa = best;
  if (isa < kScalar || isa > best) {
    return ffi::Error::InvalidArgument("fmatmul: isa " + std::to_string(isa) + " is not one this CPU has (best " +
                                       std::to_string(best) + ")");
  }
  const int64_t m = x_dims[0], k = x_dims[1], n = y_dims[1];
  if (m == 0 || n == 0) return ffi::Error::Success();
  Problem p{x.typed_data(), w.typed_data() + l * k * n, m, k, n};
  threads = jaxinfer_cpu::UsableThreads(pool, threads);
  if (k == 0) {
    std::fill(y->typed_data(), y->typed_data() + m * n, 0.0f);
  } else if (contract_first) {
    float* out = y->typed_data();
    ContractFirst(pool, threads, isa, &p, &out, 1);
  } else {
    ContractLast(pool, threads, isa, p, y->typed_data());
  }
  return ffi::Error::Success();
}

// x [M, K]; layer [] int32; the remaining args: weights [L, K, N_j] (contract_first); results y_j [M, N_j]: one call
// for a layer's q, k and v (its gate and up), every product's chunks shared among the threads.
ffi::Error FMatmulMany(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                       ffi::RemainingArgs ws, ffi::RemainingRets ys, int64_t threads, int64_t isa) {
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2 || layer.dimensions().size() != 0 || ws.size() == 0 || ws.size() != ys.size()) {
    return ffi::Error::InvalidArgument("fmatmul_many: x " + Shape(x_dims) + " must be [M, K], layer " +
                                       Shape(layer.dimensions()) + " a scalar, one weight per result (" +
                                       std::to_string(ws.size()) + " weights, " + std::to_string(ys.size()) +
                                       " results)");
  }
  const int64_t best = BestIsa();
  if (isa == kAuto) isa = best;
  if (isa < kScalar || isa > best) {
    return ffi::Error::InvalidArgument("fmatmul_many: isa " + std::to_string(isa) + " is not one this CPU has (best " +
                                       std::to_string(best) + ")");
  }
  const int64_t m = x_dims[0], k = x_dims[1], l = layer.typed_data()[0];
  std::vector<Problem> problems;
  std::vector<float*> outs;
  for (size_t j = 0; j < ws.size(); ++j) {
    auto w = ws.get<ffi::AnyBuffer>(j);
    auto y = ys.get<ffi::AnyBuffer>(j);
    if (!w.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("fmatmul_many: weight " + std::to_string(j) + " could not be read");
    }
    const auto w_dims = w->dimensions(), y_dims = (*y)->dimensions();
    if (w->element_type() != ffi::DataType::F32 || w_dims.size() != 3 || w_dims[1] != k || y_dims.size() != 2 ||
        y_dims[0] != m || y_dims[1] != w_dims[2]) {
      return ffi::Error::InvalidArgument("fmatmul_many: weight " + std::to_string(j) + " " + Shape(w_dims) +
                                         " (f32 [L, K, N]) and y " + Shape(y_dims) + " do not fit x " +
                                         Shape(x_dims));
    }
    if (l < 0 || l >= w_dims[0]) {
      return ffi::Error::InvalidArgument("fmatmul_many: layer " + std::to_string(l) + " is outside the stack's " +
                                         std::to_string(w_dims[0]));
    }
    const int64_t n = w_dims[2];
    problems.push_back({x.typed_data(), static_cast<const float*>(w->untyped_data()) + l * k * n, m, k, n});
    outs.push_back(static_cast<float*>((*y)->untyped_data()));
  }
  if (m == 0) return ffi::Error::Success();
  if (k == 0) {
    for (size_t j = 0; j < outs.size(); ++j) std::fill(outs[j], outs[j] + m * problems[j].n, 0.0f);
    return ffi::Error::Success();
  }
  ContractFirst(pool, jaxinfer_cpu::UsableThreads(pool, threads), isa, problems.data(), outs.data(),
                static_cast<int64_t>(problems.size()));
  return ffi::Error::Success();
}

}  // namespace fmm

extern "C" int64_t jaxinfer_fmatmul_best_isa() { return fmm::BestIsa(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_fmatmul, fmm::FMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("contract_first")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_fmatmul_many, fmm::FMatmulMany,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("isa"));
