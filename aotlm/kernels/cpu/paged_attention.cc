// Paged attention for XLA:CPU as an XLA FFI custom call (target aotlm_paged_attention_cpu_v1).
//
// Why a kernel: on XLA:CPU the blocked jnp path spends most of a decode step gathering KV pages
// (~6 GB/s effective inside its loops) and in loop/thunk overhead. This walks each request's
// pages in place, once per block of up to 8 of its tokens (all heads), with an online softmax.
//
// Contract: exactly aotlm/kernels/attention.py:paged_attention_ref (its jnp twin and oracle).
// Token t attends to key positions [max(0, pos - window + 1), pos] of request token_req[t]
// (window 0: no window); scores and softmax in float32; output in q's dtype. Page ids and
// positions past a request's block table are clamped, as XLA's gather clamps them.
// Bump the target's version when this contract changes: bundles name the version they need
// (u8 e4m3 and u16 bf16-bits pages are extensions: a library without them refuses the dtype
// rather than misreading it).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Consecutive tokens of one request share a key walk (their keys are read once for all).
constexpr int kBlockQueries = 8;
// Below this many (query row x key) products a step runs on the calling thread alone.
constexpr int64_t kParallelWork = 1 << 12;

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t F32ToBf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// kE4m3: the fp8 KV cache, uint8 holding float8_e4m3fn bits (KV pages only; the per-layer scales
// are folded into q and the output by the caller, aotlm/kernels/kv_quant.py).
enum class Kind { kF32, kBf16, kF16, kE4m3 };

// Every e4m3fn bit pattern's value (0x7f / 0xff are NaN; there is no infinity).
struct E4m3Table {
  float value[256];
  E4m3Table() {
    for (int b = 0; b < 256; ++b) {
      const int exponent = (b >> 3) & 0xf, mantissa = b & 0x7;
      float v = exponent == 0 ? std::ldexp(mantissa / 8.0f, -6)
                              : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
      if ((b & 0x7f) == 0x7f) v = std::numeric_limits<float>::quiet_NaN();
      value[b] = (b & 0x80) ? -v : v;
    }
  }
};
const E4m3Table kE4m3Values;

int64_t ElementBytes(Kind kind) {
  switch (kind) {
    case Kind::kF32:
      return 4;
    case Kind::kE4m3:
      return 1;
    default:
      return 2;
  }
}

// x[offset, offset + n) * scale as float32 into dst; one loop per dtype so each vectorises.
void ToF32(const void* x, int64_t offset, int64_t n, Kind kind, float scale, float* dst) {
  switch (kind) {
    case Kind::kF32: {
      const float* src = static_cast<const float*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
      break;
    }
    case Kind::kBf16: {
      const uint16_t* src = static_cast<const uint16_t*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(src[i]) * scale;
      break;
    }
    case Kind::kF16: {
      const _Float16* src = static_cast<const _Float16*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
      break;
    }
    case Kind::kE4m3: {
      const uint8_t* src = static_cast<const uint8_t*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = kE4m3Values.value[src[i]] * scale;
      break;
    }
  }
}

// src[0, n) * scale stored into x[offset, offset + n) in x's dtype.
void FromF32(const float* src, int64_t n, float scale, Kind kind, void* x, int64_t offset) {
  switch (kind) {
    case Kind::kF32: {
      float* dst = static_cast<float*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
      break;
    }
    case Kind::kBf16: {
      uint16_t* dst = static_cast<uint16_t*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = F32ToBf16(src[i] * scale);
      break;
    }
    case Kind::kF16: {
      _Float16* dst = static_cast<_Float16*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<_Float16>(src[i] * scale);
      break;
    }
    case Kind::kE4m3:  // never an output (KindOf does not give it)
      break;
  }
}

bool KindOf(ffi::DataType t, Kind* kind) {
  switch (t) {
    case ffi::DataType::F32:
      *kind = Kind::kF32;
      return true;
    case ffi::DataType::BF16:
      *kind = Kind::kBf16;
      return true;
    case ffi::DataType::F16:
      *kind = Kind::kF16;
      return true;
    default:
      return false;
  }
}

bool KvKindOf(ffi::DataType t, Kind* kind) {
  if (t == ffi::DataType::U8) {
    *kind = Kind::kE4m3;
    return true;
  }
  if (t == ffi::DataType::U16) {  // bfloat16 bits (aotlm/kernels/kv_quant.py)
    *kind = Kind::kBf16;
    return true;
  }
  return KindOf(t, kind);
}

// One unit of work: up to kBlockQueries consecutive tokens of one request, every KV head (a
// page is read whole, front to back, by one thread).
struct Item {
  int32_t first, count, req, lo, hi;  // tokens [first, first+count), keys [lo, hi)
};

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  Kind q_kind, kv_kind;
  const int32_t* positions;
  const int32_t* block_tables;
  int64_t heads, kv_heads, group, dim, page_size, num_pages, pages_per_seq, layer_offset;
  float scale;
  int32_t window;
};

// Rows [n, dim] of one KV head starting at element `offset` of the cache, as float32: a pointer
// into the cache itself when it is float32, else converted into `scratch`.
const float* Rows(const Problem& p, const void* cache, int64_t offset, int64_t n,
                  int64_t* stride, float* scratch) {
  const int64_t row_stride = p.kv_heads * p.dim;
  if (p.kv_kind == Kind::kF32) {
    *stride = row_stride;
    return static_cast<const float*>(cache) + offset;
  }
  for (int64_t r = 0; r < n; ++r)
    ToF32(cache, offset + r * row_stride, p.dim, p.kv_kind, 1.0f, scratch + r * p.dim);
  *stride = p.dim;
  return scratch;
}

struct Scratch {
  std::vector<float> q, acc, m, l, s, keys, values;
};

// Eight float lanes in GCC/Clang's portable vector extension: the compiler maps it to AVX/NEON
// registers where they exist and splits it where they do not.
typedef float V8 __attribute__((vector_size(32)));
typedef float V8Unaligned __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kLanes = 8;

inline V8 LoadV(const float* x) { return *reinterpret_cast<const V8Unaligned*>(x); }

inline void StoreV(float* x, V8 v) { *reinterpret_cast<V8Unaligned*>(x) = v; }

typedef int32_t I8 __attribute__((vector_size(32)));

inline V8 Splat(float x) { return V8{} + x; }

// exp(x) for x <= 0 on eight lanes in float32 (relative error ~2e-7): branch-free, so it
// vectorises (std::exp is a libm call per element); rounds by the 1.5 * 2^23 trick.
inline V8 ExpV(V8 x) {
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;
  const V8 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V8 y = Splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return (V8)((I8)y + (__builtin_convertvector(n, I8) << 23));
}

// r[i] = sum of a[i]'s lanes: eight horizontal sums in 7 shuffle-adds instead of 8 x 3.
inline V8 Sum8(const V8* a) {
  V8 t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)
    u[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(t[2 * i], t[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// The same tree as Sum8, so a score does not depend on which path summed it.
inline float Sum(V8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// Rows [r0, r0 + B) of an item over keys [0, n) of one page: scores, online softmax, values.
// B rows share every key and value load; their accumulators stay in registers over the keys.
// Rows of one KV head are w's rows [base, base + count * group); r0 counts from base.
template <int B>
void RowBlock(const Problem& p, const Item& it, Scratch& w, int64_t base, int64_t r0,
              int64_t start, int64_t n, const float* keys, int64_t ks, const float* values,
              int64_t vs) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  const int64_t dim = p.dim, page_size = p.page_size;
  int64_t lo[B], hi[B];
  int64_t j_lo = n, j_hi = 0;
  for (int b = 0; b < B; ++b) {
    const int64_t pos = p.positions[it.first + (r0 + b) / p.group];
    hi[b] = std::min<int64_t>(n, pos - start + 1);
    lo[b] = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1 - start) : 0;
    if (hi[b] > lo[b]) {
      j_lo = std::min(j_lo, lo[b]);
      j_hi = std::max(j_hi, hi[b]);
    }
  }
  if (j_hi <= j_lo) return;
  const float* q[B];
  float* s[B];
  const int64_t sp = (page_size + kLanes - 1) / kLanes * kLanes;  // a row of w.s
  for (int b = 0; b < B; ++b) {
    q[b] = w.q.data() + (base + r0 + b) * dim;
    s[b] = w.s.data() + b * sp;
    for (int64_t c = 0; c < sp; c += kLanes) StoreV(s[b] + c, Splat(kNone));
  }
  // Scores in tiles of B rows x (8 / B) keys: eight accumulators reduced together.
  constexpr int kKeys = kLanes / B;
  int64_t j = j_lo;
  for (; j + kKeys <= j_hi; j += kKeys) {
    V8 acc[kLanes] = {};
    for (int64_t d = 0; d < dim; d += kLanes) {
#pragma GCC unroll 8
      for (int kk = 0; kk < kKeys; ++kk) {
        const V8 k = LoadV(keys + (j + kk) * ks + d);
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) acc[kk * B + b] += LoadV(q[b] + d) * k;
      }
    }
    const V8 sums = Sum8(acc);
#pragma GCC unroll 8
    for (int kk = 0; kk < kKeys; ++kk)
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) s[b][j + kk] = sums[kk * B + b];
  }
  for (; j < j_hi; ++j) {
    const float* kj = keys + j * ks;
    V8 acc[B] = {};
    for (int64_t d = 0; d < dim; d += kLanes) {
      const V8 k = LoadV(kj + d);
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) acc[b] += LoadV(q[b] + d) * k;
    }
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) s[b][j] = Sum(acc[b]);
  }
  for (int b = 0; b < B; ++b)
    for (int64_t jj = j_lo; jj < j_hi; ++jj)
      if (jj < lo[b] || jj >= hi[b]) s[b][jj] = kNone;
  // The softmax over the whole (padded) page row, invisible keys at -inf: every lane holds the
  // same key whichever keys the block's other rows see, so a row's sums never depend on them.
  float correction[B];
  for (int b = 0; b < B; ++b) {
    const int64_t r = base + r0 + b;
    V8 most = Splat(kNone);
    for (int64_t c = 0; c < sp; c += kLanes) {
      const V8 x = LoadV(s[b] + c);
      most = x > most ? x : most;
    }
    float page_max = kNone;
    for (int i = 0; i < kLanes; ++i) page_max = std::max(page_max, most[i]);
    if (page_max == kNone) {  // nothing visible to this row on this page
      correction[b] = 1.0f;
      for (int64_t c = 0; c < sp; c += kLanes) StoreV(s[b] + c, V8{});
      continue;
    }
    const float m_new = std::max(w.m[r], page_max);
    correction[b] = ExpV(Splat(w.m[r] - m_new))[0];  // ~0 first: acc, l still 0
    V8 sum = {};
    for (int64_t c = 0; c < sp; c += kLanes) {
      const V8 x = LoadV(s[b] + c);
      const V8 e = x == Splat(kNone) ? V8{} : ExpV(x - m_new);
      StoreV(s[b] + c, e);
      sum += e;
    }
    w.l[r] = w.l[r] * correction[b] + Sum(sum);
    w.m[r] = m_new;
  }
  for (int64_t d = 0; d < dim; d += kLanes) {
    V8 acc[B];
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b)
      acc[b] = LoadV(w.acc.data() + (base + r0 + b) * dim + d) * correction[b];
    for (int64_t j = j_lo; j < j_hi; ++j) {
      const V8 v = LoadV(values + j * vs + d);
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) acc[b] += s[b][j] * v;
    }
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) StoreV(w.acc.data() + (base + r0 + b) * dim + d, acc[b]);
  }
}

void RunItem(const Problem& p, const Item& it, Scratch& w) {
  const int64_t head_rows = it.count * p.group, rows = it.count * p.heads;
  const int64_t dim = p.dim, page_size = p.page_size;
  w.q.resize(rows * dim);
  w.acc.assign(rows * dim, 0.0f);
  w.m.assign(rows, -std::numeric_limits<float>::infinity());
  w.l.assign(rows, 0.0f);
  w.s.resize(4 * ((page_size + kLanes - 1) / kLanes * kLanes));
  w.keys.resize(page_size * dim);
  w.values.resize(page_size * dim);
  // w's row of token i, query head h (KV head h / group): its KV head's rows, then i, then h's
  // place in the group; the scale folded into q.
  auto row = [&](int64_t i, int64_t h) {
    return (h / p.group) * head_rows + i * p.group + h % p.group;
  };
  for (int64_t i = 0; i < it.count; ++i)
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t src = ((it.first + i) * p.heads + h) * dim;
      ToF32(p.q, src, dim, p.q_kind, p.scale, w.q.data() + row(i, h) * dim);
    }
  const int32_t* table = p.block_tables + static_cast<int64_t>(it.req) * p.pages_per_seq;
  const int64_t page_elems = page_size * p.kv_heads * dim;
  const int64_t page_bytes = page_elems * ElementBytes(p.kv_kind);
  // Whole pages from the one holding it.lo: a key's place in a page row (its softmax lane)
  // never depends on where the block's window starts; keys before a row's window are masked.
  for (int64_t start = it.lo / page_size * page_size; start < it.hi;) {
    const int64_t logical = start / page_size;
    const int64_t n = std::min<int64_t>(page_size, it.hi - start);
    const int64_t page = std::clamp<int64_t>(table[logical], 0, p.num_pages - 1);
    if (start + n < it.hi) {
      // The next page is anywhere in the pool: no hardware prefetcher guesses it.
      const int64_t next = std::clamp<int64_t>(table[logical + 1], 0, p.num_pages - 1);
      const int64_t at = (p.layer_offset + next) * page_bytes;
      for (int64_t b = 0; b < page_bytes; b += 64) {
        __builtin_prefetch(static_cast<const char*>(p.k) + at + b);
        __builtin_prefetch(static_cast<const char*>(p.v) + at + b);
      }
    }
    for (int64_t kv = 0; kv < p.kv_heads; ++kv) {
      const int64_t offset =
          (p.layer_offset + page) * page_size * p.kv_heads * dim + kv * dim;
      int64_t ks, vs;
      const float* keys = Rows(p, p.k, offset, n, &ks, w.keys.data());
      const float* values = Rows(p, p.v, offset, n, &vs, w.values.data());
      const int64_t base = kv * head_rows;
      int64_t r = 0;
      for (; r + 4 <= head_rows; r += 4)
        RowBlock<4>(p, it, w, base, r, start, n, keys, ks, values, vs);
      for (; r + 2 <= head_rows; r += 2)
        RowBlock<2>(p, it, w, base, r, start, n, keys, ks, values, vs);
      for (; r < head_rows; ++r) RowBlock<1>(p, it, w, base, r, start, n, keys, ks, values, vs);
    }
    start += n;
  }
  for (int64_t i = 0; i < it.count; ++i)
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t r = row(i, h);
      const int64_t dst = ((it.first + i) * p.heads + h) * dim;
      // A row that saw no key (cannot happen for a valid position) is 0, never NaN.
      const float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
      FromF32(w.acc.data() + r * dim, dim, inv, p.q_kind, p.out, dst);
    }
}

// Runs items over the caller and the intra-op pool. The caller claims items too, so the step
// finishes even if no pool thread ever picks a task up; helpers that start after the last item
// was claimed touch nothing but the shared counters.
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

void Drain(const Problem& p, const std::vector<Item>& items, Shared& shared) {
  thread_local Scratch scratch;
  const int64_t total = static_cast<int64_t>(items.size());
  for (int64_t i; (i = shared.next.fetch_add(1)) < total;) {
    RunItem(p, items[i], scratch);
    if (shared.done.fetch_add(1) + 1 == total) {
      std::lock_guard<std::mutex> lock(shared.mu);
      shared.cv.notify_all();
    }
  }
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_pages,
                ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> positions,
                ffi::Buffer<ffi::S32> token_req, ffi::Buffer<ffi::S32> block_tables,
                ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out, float scale,
                int32_t window) {
  const auto qd = q.dimensions();
  const auto kd = k_pages.dimensions();
  const auto bd = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || bd.size() != 2)
    return ffi::Error::InvalidArgument("aotlm paged attention: q [T,NH,D], cache [L,N,S,KV,D], "
                                       "block_tables [R,P] expected");
  if (v_pages.dimensions().size() != 5 || v_pages.element_type() != k_pages.element_type() ||
      out->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("aotlm paged attention: mismatched cache or output types");
  Problem p;
  if (!KindOf(q.element_type(), &p.q_kind) || !KvKindOf(k_pages.element_type(), &p.kv_kind))
    return ffi::Error::InvalidArgument(
        "aotlm paged attention: q f32, bf16 or f16; pages those or u8 (e4m3 bits) only");
  const int64_t tokens = qd[0];
  p.heads = qd[1];
  p.dim = qd[2];
  p.num_pages = kd[1];
  p.page_size = kd[2];
  p.kv_heads = kd[3];
  if (kd[4] != p.dim || p.kv_heads <= 0 || p.heads % p.kv_heads != 0)
    return ffi::Error::InvalidArgument("aotlm paged attention: head dims do not match");
  if (p.dim % kLanes != 0)
    return ffi::Error::InvalidArgument("aotlm paged attention: head_dim must be a multiple of 8");
  p.group = p.heads / p.kv_heads;
  p.pages_per_seq = bd[1];
  const int64_t requests = bd[0];
  const int64_t layers = kd[0];
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, layers - 1);
  p.layer_offset = l * p.num_pages;
  p.q = q.untyped_data();
  p.k = k_pages.untyped_data();
  p.v = v_pages.untyped_data();
  p.out = out->untyped_data();
  p.positions = positions.typed_data();
  p.block_tables = block_tables.typed_data();
  p.scale = scale;
  p.window = window;
  if (tokens == 0) return ffi::Error::Success();
  if (requests == 0 || p.pages_per_seq == 0 || p.num_pages == 0)
    return ffi::Error::InvalidArgument("aotlm paged attention: empty block tables or cache");

  const int32_t* pos = positions.typed_data();
  const int32_t* req = token_req.typed_data();
  const int64_t max_keys = p.pages_per_seq * p.page_size;
  std::vector<Item> items;
  int64_t work = 0;
  for (int64_t t = 0; t < tokens;) {
    int64_t n = 1;
    while (t + n < tokens && n < kBlockQueries && req[t + n] == req[t] &&
           pos[t + n] == pos[t + n - 1] + 1)
      ++n;
    const int32_t r = static_cast<int32_t>(std::clamp<int64_t>(req[t], 0, requests - 1));
    const int64_t first_pos = std::max<int64_t>(pos[t], 0);
    const int64_t last_pos = std::max<int64_t>(pos[t + n - 1], 0);
    const int64_t hi = std::min<int64_t>(last_pos + 1, max_keys);
    const int64_t lo = window > 0 ? std::clamp<int64_t>(first_pos - window + 1, 0, hi) : 0;
    items.push_back({static_cast<int32_t>(t), static_cast<int32_t>(n), r,
                     static_cast<int32_t>(lo), static_cast<int32_t>(hi)});
    work += (hi - lo) * n * p.heads;
    t += n;
  }
  // Longest walks first, so the last items to finish are short ones.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return static_cast<int64_t>(a.hi - a.lo) * a.count > static_cast<int64_t>(b.hi - b.lo) * b.count;
  });

  auto shared = std::make_shared<Shared>();
  const int64_t helpers =
      work < kParallelWork ? 0 : std::min<int64_t>(pool.num_threads(), items.size()) - 1;
  // Helpers copy the problem and hold the item list alive until they return.
  auto state = std::make_shared<std::pair<Problem, std::vector<Item>>>(p, std::move(items));
  for (int64_t i = 0; i < helpers; ++i)
    pool.Schedule([shared, state] { Drain(state->first, state->second, *shared); });
  Drain(state->first, state->second, *shared);
  const int64_t total = static_cast<int64_t>(state->second.size());
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == total; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AotlmPagedAttentionCpuV1, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // q [T, NH, D]
                                  .Arg<ffi::AnyBuffer>()         // k_pages [L, N, S, KV, D]
                                  .Arg<ffi::AnyBuffer>()         // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // token_req [T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables [R, P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::AnyBuffer>()         // out [T, NH, D]
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window"));
