// Paged attention on the CPU, an XLA FFI handler: o[B, T, N, H] = softmax(q k^T / sqrt(H)) v over the KV pool as it
// lies, following each row's page table; nothing gathered, nothing dequantized ahead.
//
//   q            [B, T, N, H] f32     queries at q_positions [B, T] (-1: a padding row, output 0)
//   k/v pages    [L, K, P, page_size, H] f32, bf16, int8 (a f32 scale per vector) or f8e4m3fn (a f32 scale per
//                layer); `layer` [] s32 picks the layer, so the decoder's scan passes the whole stacked pool
//   k/v scales   int8: [L, K, P, page_size] f32; fp8: [L] f32; float pages: ignored
//   page_table   [B, pages_per_seq] s32 (page 0 is the engine's null page: nothing special here)
//   kv_lengths   [B] s32: keys 0..kv_lengths-1 are written
// A query at position p sees keys s < kv_length with s <= p and, with a sliding window w, s > p - w. N = G * K (GQA).
//
// Work: units of (batch row, kv head, a block of query tokens, a range of keys). A unit's rows are the G heads of its
// kv head at each of its tokens, so every key and value loaded serves G * tokens queries. Keys are taken kTileKeys at
// a time (a tile may span pages), converted to float32 with their scales, scored against every row that sees them,
// and folded into each row's running max, sum and output (online softmax, float32). A long key range is split across
// units when there are too few (decode at batch 1) and the partial results merged after (flash-decoding).
// Instruction sets: paged_attention_tile.inc compiled three times (portable 16-byte vectors, AVX2 + FMA, AVX-512F),
// picked at run time.
// Threads: XLA's intra-op pool; units are claimed through an atomic counter by the calling thread and helper tasks,
// and the caller waits only for units already claimed (it may itself run on a pool worker).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pa {

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };  // the `isa` attribute's values
enum class Storage { kF32, kBF16, kInt8, kFp8 };

constexpr int64_t kTileKeys = 32;   // keys loaded and scored together
constexpr int64_t kMaxRows = 64;    // query rows (G * tokens) per unit
constexpr int64_t kTransposeFromRows = 8;  // rows per unit from which a tile's keys are transposed (keys on lanes)
constexpr int64_t kSplitKeys = 512;  // the fewest keys worth a unit of their own when a range is split
constexpr float kMasked = -1e30f;   // the running max before any key: finite, so exp(kMasked - m) is 0, not NaN

struct Problem {
  const float* q;             // [B, T, N, H]
  const int32_t* positions;   // [B, T]
  const int32_t* page_table;  // [B, pages_per_seq]
  const int32_t* kv_lengths;  // [B]
  Storage storage;
  const void* k;              // the layer's pages [K, P, page_size, H]
  const void* v;
  int64_t element_bytes;      // of one stored K/V element
  const float* k_scales;      // int8: the layer's [K, P, page_size]; else null
  const float* v_scales;
  float k_scale, v_scale;     // fp8: the layer's scale; else 1
  const float* fp8;           // [256] float8_e4m3fn code -> float
  int64_t batch, tokens, heads, kv_heads, group, head_dim;
  int64_t num_pages, page_size, pages_per_seq, window;  // window 0: none
  float scale;                // 1 / sqrt(H)
};

// Queries of tokens [t0, t1) of row b, every head of kv_head, against keys [s0, s1).
struct Unit {
  int64_t b, kv_head, t0, t1;
  int32_t s0, s1;
  int64_t item;  // which (b, kv_head, token block) it is part of
};

// Keys [lo, hi) the query of row b at token t sees (empty for a padding row).
inline void VisibleKeys(const Problem& pr, int64_t b, int64_t t, int32_t* lo, int32_t* hi) {
  const int64_t p = pr.positions[b * pr.tokens + t];
  const int64_t written = std::min<int64_t>(pr.kv_lengths[b], pr.pages_per_seq * pr.page_size);
  *hi = static_cast<int32_t>(p < 0 ? 0 : std::max<int64_t>(0, std::min(written, p + 1)));
  *lo = static_cast<int32_t>(pr.window > 0 ? std::max<int64_t>(0, p - pr.window + 1) : 0);
  if (*lo > *hi) *lo = *hi;
}

// Key s of row b, kv head kv_head -> its vector's index in the layer's [K, P, page_size] (page ids clipped to the
// pool, as XLA's gather clips them).
inline int64_t VectorIndex(const Problem& pr, int64_t b, int64_t kv_head, int64_t s) {
  int64_t page = pr.page_table[b * pr.pages_per_seq + s / pr.page_size];
  page = std::min<int64_t>(std::max<int64_t>(page, 0), pr.num_pages - 1);
  return (kv_head * pr.num_pages + page) * pr.page_size + s % pr.page_size;
}

}  // namespace pa

#define PA_NS portable
#define PA_VECTOR_BYTES 16
#include "paged_attention_tile.inc"
#undef PA_NS
#undef PA_VECTOR_BYTES

#if defined(__x86_64__) || defined(_M_X64)
#define PA_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#define PA_NS avx2
#define PA_VECTOR_BYTES 32
#include "paged_attention_tile.inc"
#undef PA_NS
#undef PA_VECTOR_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f")
#pragma GCC optimize("fp-contract=fast")
#define PA_NS avx512
#define PA_VECTOR_BYTES 64
#include "paged_attention_tile.inc"
#undef PA_NS
#undef PA_VECTOR_BYTES
#pragma GCC pop_options
#else
#define PA_X86 0
#endif

namespace pa {

int64_t BestIsa() {
#if PA_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

void RunUnit(int64_t isa, const Problem& pr, const Unit& u, float* partial, float* scratch) {
#if PA_X86
  if (isa == kAvx512) return avx512::RunUnit(pr, u, partial, scratch);
  if (isa == kAvx2) return avx2::RunUnit(pr, u, partial, scratch);
#endif
  portable::RunUnit(pr, u, partial, scratch);
}

using jaxinfer_cpu::ParallelFor;
using jaxinfer_cpu::UsableThreads;

// The units: per (b, kv head, token block) the union of its rows' visible keys, split into several units when there
// are fewer items than 4 per thread and the range is long. items_out: the number of (b, kv head, token block).
std::vector<Unit> PlanUnits(const Problem& pr, int64_t tokens_per_block, int64_t threads, int64_t* items_out) {
  struct Item { int64_t b, kv_head, t0, t1; int32_t lo, hi; };
  std::vector<Item> items;
  for (int64_t b = 0; b < pr.batch; ++b) {
    for (int64_t t0 = 0; t0 < pr.tokens; t0 += tokens_per_block) {
      const int64_t t1 = std::min(pr.tokens, t0 + tokens_per_block);
      int32_t lo = INT32_MAX, hi = 0;
      for (int64_t t = t0; t < t1; ++t) {
        int32_t row_lo, row_hi;
        VisibleKeys(pr, b, t, &row_lo, &row_hi);
        if (row_lo < row_hi) lo = std::min(lo, row_lo), hi = std::max(hi, row_hi);
      }
      for (int64_t kv_head = 0; kv_head < pr.kv_heads; ++kv_head) items.push_back({b, kv_head, t0, t1, lo, hi});
    }
  }
  *items_out = static_cast<int64_t>(items.size());
  const int64_t wanted = std::max<int64_t>(1, (4 * threads + *items_out - 1) / std::max<int64_t>(1, *items_out));
  std::vector<Unit> units;
  for (int64_t i = 0; i < *items_out; ++i) {
    const Item& it = items[i];
    if (it.lo >= it.hi) continue;  // no row of it sees a key: its output stays 0
    const int64_t keys = it.hi - it.lo;
    const int64_t splits = std::max<int64_t>(1, std::min(wanted, keys / kSplitKeys));
    const int64_t per = (keys + splits - 1) / splits;
    for (int64_t s0 = it.lo; s0 < it.hi; s0 += per) {
      units.push_back({it.b, it.kv_head, it.t0, it.t1, static_cast<int32_t>(s0),
                       static_cast<int32_t>(std::min<int64_t>(it.hi, s0 + per)), i});
    }
  }
  return units;
}

// The units' partial rows [m, l, acc[H]] of one item merged into its output rows (0 where no key was seen).
void MergeItem(const Problem& pr, const std::vector<Unit>& units, const float* partials, int64_t stride, int64_t first,
               int64_t last, float* o) {
  const Unit& u = units[first];
  const int64_t h = pr.head_dim, width = 2 + h, rows = pr.group * (u.t1 - u.t0);
  for (int64_t r = 0; r < rows; ++r) {
    float m = kMasked;
    for (int64_t i = first; i < last; ++i) m = std::max(m, partials[i * stride + r * width]);
    const int64_t t = u.t0 + r / pr.group, head = u.kv_head * pr.group + r % pr.group;
    float* out = o + ((u.b * pr.tokens + t) * pr.heads + head) * h;  // o [B, T, N, H]
    float l = 0.0f;
    std::fill(out, out + h, 0.0f);
    for (int64_t i = first; i < last; ++i) {
      const float* part = partials + i * stride + r * width;
      if (part[1] == 0.0f) continue;  // saw no key
      const float weight = std::exp(part[0] - m);
      l += part[1] * weight;
      for (int64_t j = 0; j < h; ++j) out[j] += part[2 + j] * weight;
    }
    if (l > 0.0f) {
      const float inverse = 1.0f / l;
      for (int64_t j = 0; j < h; ++j) out[j] *= inverse;
    }
  }
}

// float8_e4m3fn code -> float: 4 exponent bits (bias 7), 3 mantissa bits, no infinities, S.1111.111 is NaN.
void Fp8Table(float* table) {
  for (uint32_t code = 0; code < 256; ++code) {
    const uint32_t exponent = (code >> 3) & 15, mantissa = code & 7;
    float magnitude = exponent == 0 ? static_cast<float>(mantissa) * (1.0f / 512.0f)  // subnormal: m / 8 * 2^-6
                                    : __builtin_bit_cast(float, ((exponent + 120) << 23) | (mantissa << 20));
    if (exponent == 15 && mantissa == 7) magnitude = NAN;
    table[code] = (code & 128) ? -magnitude : magnitude;
  }
}

std::string Shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

ffi::Error Invalid(const std::string& message) { return ffi::Error::InvalidArgument("paged_attention: " + message); }

// The pages' storage, or an error naming their dtype.
ffi::Error StorageOf(ffi::DataType dtype, Storage* storage) {
  switch (dtype) {
    case ffi::DataType::F32: *storage = Storage::kF32; return ffi::Error::Success();
    case ffi::DataType::BF16: *storage = Storage::kBF16; return ffi::Error::Success();
    case ffi::DataType::S8: *storage = Storage::kInt8; return ffi::Error::Success();
    case ffi::DataType::F8E4M3FN: *storage = Storage::kFp8; return ffi::Error::Success();
    default: return Invalid("pages must be float32, bfloat16, int8 or float8_e4m3fn");
  }
}

// The problem the operands describe, their shapes and dtypes checked; the layer's pages and scales located.
// fp8: a [256] table the caller keeps alive.
ffi::Error Describe(ffi::Buffer<ffi::F32>& q, ffi::AnyBuffer& k_pages, ffi::AnyBuffer& v_pages,
                    ffi::Buffer<ffi::F32>& k_scales, ffi::Buffer<ffi::F32>& v_scales,
                    ffi::Buffer<ffi::S32>& page_table, ffi::Buffer<ffi::S32>& q_positions,
                    ffi::Buffer<ffi::S32>& kv_lengths, ffi::Buffer<ffi::S32>& layer, float* fp8, Problem* pr) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), vd = v_pages.dimensions();
  auto td = page_table.dimensions(), pd = q_positions.dimensions(), ld = kv_lengths.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      k_pages.element_type() != v_pages.element_type()) {
    return Invalid("q " + Shape(qd) + " must be [B, T, N, H]; k and v pages " + Shape(kd) + ", " + Shape(vd) +
                   " the same [L, K, P, page_size, H] and dtype");
  }
  const int64_t batch = qd[0], tokens = qd[1], heads = qd[2], head_dim = qd[3];
  const int64_t num_layers = kd[0], kv_heads = kd[1];
  if (kd[4] != head_dim || kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > kMaxRows || kd[2] <= 0 ||
      kd[3] <= 0 || td.size() != 2 || td[0] != batch || pd.size() != 2 || pd[0] != batch || pd[1] != tokens ||
      ld.size() != 1 || ld[0] != batch || layer.element_count() != 1) {
    return Invalid("shapes do not fit: q " + Shape(qd) + ", pages " + Shape(kd) + ", page_table " + Shape(td) +
                   ", q_positions " + Shape(pd) + ", kv_lengths " + Shape(ld) + " (at most " +
                   std::to_string(kMaxRows) + " heads per kv head)");
  }
  *pr = Problem{};
  pr->q = q.typed_data();
  pr->positions = q_positions.typed_data();
  pr->page_table = page_table.typed_data();
  pr->kv_lengths = kv_lengths.typed_data();
  pr->batch = batch, pr->tokens = tokens, pr->heads = heads, pr->kv_heads = kv_heads;
  pr->group = heads / kv_heads, pr->head_dim = head_dim;
  pr->num_pages = kd[2], pr->page_size = kd[3], pr->pages_per_seq = td[1];
  pr->scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  if (ffi::Error e = StorageOf(k_pages.element_type(), &pr->storage); e.failure()) return e;

  const int64_t l = std::min<int64_t>(std::max<int64_t>(layer.typed_data()[0], 0), num_layers - 1);
  const int64_t layer_vectors = kv_heads * pr->num_pages * pr->page_size;  // [K, P, page_size]
  pr->element_bytes = static_cast<int64_t>(ffi::ByteWidth(k_pages.element_type()));
  const int64_t layer_bytes = layer_vectors * head_dim * pr->element_bytes;
  pr->k = static_cast<const char*>(k_pages.untyped_data()) + l * layer_bytes;
  pr->v = static_cast<const char*>(v_pages.untyped_data()) + l * layer_bytes;
  pr->k_scale = pr->v_scale = 1.0f;
  pr->fp8 = fp8;
  if (pr->storage == Storage::kInt8) {
    const size_t vectors = num_layers * layer_vectors;
    if (k_scales.element_count() != vectors || v_scales.element_count() != vectors) {
      return Invalid("int8 pages need k and v scales [L, K, P, page_size], got " + Shape(k_scales.dimensions()));
    }
    pr->k_scales = k_scales.typed_data() + l * layer_vectors;
    pr->v_scales = v_scales.typed_data() + l * layer_vectors;
  }
  if (pr->storage == Storage::kFp8) {
    if (k_scales.element_count() != static_cast<size_t>(num_layers) ||
        v_scales.element_count() != static_cast<size_t>(num_layers)) {
      return Invalid("fp8 pages need k and v scales [L], got " + Shape(k_scales.dimensions()));
    }
    Fp8Table(fp8);
    pr->k_scale = k_scales.typed_data()[l];
    pr->v_scale = v_scales.typed_data()[l];
  }
  return ffi::Error::Success();
}

// The units on the pool's threads, then each item's units merged into o [B, T, N, H] (zeros where nothing is seen).
void Attend(ffi::ThreadPool& pool, const Problem& pr, int64_t threads, int64_t isa, float* o) {
  std::fill(o, o + pr.batch * pr.tokens * pr.heads * pr.head_dim, 0.0f);
  int64_t num_items = 0;
  const int64_t tokens_per_block = std::min(pr.tokens, std::max<int64_t>(1, kMaxRows / pr.group));
  const std::vector<Unit> units = PlanUnits(pr, tokens_per_block, threads, &num_items);
  if (units.empty()) return;
  const int64_t width = 2 + pr.head_dim, stride = pr.group * tokens_per_block * width;  // a unit's [Q, 2 + H]
  const int64_t scratch_floats = (3 * kTileKeys + kMaxRows) * pr.head_dim;
  // [units, Q, 2 + H], every row written by its unit before it is read: no zeroing (a decode step's would be most
  // of its memory traffic after the pages).
  std::unique_ptr<float[]> partials(new float[units.size() * stride]);
  ParallelFor(pool, threads, static_cast<int64_t>(units.size()), [&](int64_t i) {
    std::vector<float> scratch(scratch_floats);  // tiles and scaled queries: once per unit, not per tile
    RunUnit(isa, pr, units[i], partials.get() + i * stride, scratch.data());
  });
  for (size_t first = 0; first < units.size();) {
    size_t last = first + 1;
    while (last < units.size() && units[last].item == units[first].item) ++last;
    MergeItem(pr, units, partials.get(), stride, first, last, o);
    first = last;
  }
}

// q [B, T, N, H] f32; k/v pages [L, K, P, page_size, H]; k/v scales f32 (see the top); page_table [B, pages_per_seq]
// s32; q_positions [B, T] s32; kv_lengths [B] s32; layer [] s32 -> o [B, T, N, H] f32.
ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                          ffi::Buffer<ffi::F32> k_scales, ffi::Buffer<ffi::F32> v_scales,
                          ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> q_positions,
                          ffi::Buffer<ffi::S32> kv_lengths, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> o, int64_t sliding_window, int64_t threads, int64_t isa) {
  Problem pr;
  float fp8[256];
  ffi::Error e = Describe(q, k_pages, v_pages, k_scales, v_scales, page_table, q_positions, kv_lengths, layer, fp8,
                          &pr);
  if (e.failure()) return e;
  pr.window = std::max<int64_t>(0, sliding_window);
  const int64_t best = BestIsa();
  if (isa == kAuto) isa = best;
  if (isa < kScalar || isa > best) {
    return Invalid("isa " + std::to_string(isa) + " is not one this CPU has (best " + std::to_string(best) + ")");
  }
  threads = UsableThreads(pool, threads);
  Attend(pool, pr, threads, isa, o->typed_data());
  return ffi::Error::Success();
}

}  // namespace pa

extern "C" int64_t jaxinfer_paged_attention_best_isa() { return pa::BestIsa(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_paged_attention, pa::PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::AnyBuffer>()          // k_pages
                                  .Arg<ffi::AnyBuffer>()          // v_pages
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_scales
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_scales
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_positions
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_lengths
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("isa"));
