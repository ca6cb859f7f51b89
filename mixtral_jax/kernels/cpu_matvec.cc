// The decode step's CPU work for XLA:CPU through the XLA FFI: small-batch weight reads and attention.
//
// Why: a decode step on CPU is a stream of weight reads (one or a few activation rows against every
// weight matrix). XLA:CPU's dot reaches ~60% of the memory bandwidth on a matrix-vector product and
// never fuses an int8 -> float convert into it (it writes a float copy of the weight first), the
// grouped MoE pays a conditional per expert, and attention over a cache is ~20 small ops plus a
// transposed copy of the keys. These kernels stream each weight once, contiguously, in its stored
// dtype (float32, bfloat16 or int8 with per-column scales), on their own worker threads:
//   mixtral_matvec  y_i = x @ w_i           (attention projections, LM head)
//   mixtral_moe     the experts' SwiGLU     (one call per layer, only the experts used are read)
//   mixtral_attend  softmax(q k^T) v        (a few queries over a KV cache, hidden slots unread)
//
// Numbers: float32 accumulation; int8 products are scaled per output column after the sum, as
// mixtral_jax.model.quant does. AVX-512 intrinsics where the CPU has them, portable loops elsewhere (built
// with -O3 -march=native by mixtral_jax/kernels/cpu.py).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Work sharing. XLA's intra-op pool wakes a sleeping thread too late for a 50-microsecond product (a
// helper scheduled there picked up ~10% of the chunks), so the kernels keep their own workers, as
// llama.cpp and OpenMP do: after a call they spin for a while (the next product of a decode step comes
// within microseconds), then sleep. Each call's chunks are claimed from that call's own counter, so a
// worker that is late costs nothing (the caller does what is left), and concurrent calls (XLA running
// two independent products at once) stay correct: the workers help the latest.

class Workers {
 public:
  static Workers& get() {
    static Workers* w = new Workers();  // never destroyed: workers may be spinning at exit
    return *w;
  }

  int64_t size() const { return static_cast<int64_t>(threads_.size()) + 1; }

  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 1 || threads_.empty()) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto work = std::make_shared<Work>(&fn, n);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = work;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work->run();
    // Every chunk was claimed; wait for the ones a worker is still on. A worker that comes late finds
    // none left and never touches `fn` (its counter belongs to this call's `Work`, which it keeps alive).
    while (work->done.load(std::memory_order_acquire) < n) pause();
  }

 private:
  struct Work {
    Work(const std::function<void(int64_t)>* f, int64_t count) : fn(f), n(count) {}
    void run() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        (*fn)(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
    const std::function<void(int64_t)>* fn;
    const int64_t n;
    std::atomic<int64_t> next{0}, done{0};
  };

  Workers() {
    int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
#if defined(__linux__)
    cpu_set_t allowed;  // the cores this process may use (taskset, containers), not the machine's
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0) cores = std::max(1, CPU_COUNT(&allowed));
#endif
    if (const char* env = std::getenv("MIXTRAL_JAX_KERNEL_THREADS")) {
      cores = std::clamp<int64_t>(std::atoll(env), 1, cores);
    }
    try {
      for (int64_t i = 1; i < cores; ++i) threads_.emplace_back([this] { loop(); });
    } catch (const std::system_error&) {  // fewer workers (or none): the caller does the rest
    }
    for (auto& t : threads_) t.detach();
  }

  static void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        pause();
        if (++spins % 1024 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      std::shared_ptr<Work> work;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        work = current_;
        seen = generation_.load(std::memory_order_acquire);
      }
      if (work) work->run();
    }
  }

  static constexpr std::chrono::microseconds kSpin{300};
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Work> current_;  // the latest call's work (guarded by mutex_)
};

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) { Workers::get().parallel_for(n, fn); }

// ---------------------------------------------------------------------------------------------
// Weight element -> float.

inline float to_float(float w) { return w; }
inline float to_float(int8_t w) { return static_cast<float>(w); }
inline float to_float(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// acc[i, :] += sum_{d0 <= d < d1} x[i, d] * w[d, :] for i < m. `w` is (D, F) row-major: rows d0..d1
// are one contiguous region, streamed once, sixteen rows per pass, each group of weights loaded (and
// converted) once for all m rows of x. The accumulators (m x F floats) stay in L1/L2.
//
// Sixteen rows per pass because the loads, not the FMAs, bound this loop: each pass loads and stores
// its 16 accumulator floats once per 16 weight vectors. Measured on a 2-core AVX-512 machine streaming
// a decode step's 263 MB: 8 rows with x broadcast from memory 41 GB/s, 16 rows with x held in
// registers 50 GB/s, a plain sum of the same bytes 57 GB/s.
constexpr int64_t kRows = 16;

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const uint16_t* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

#if defined(__AVX512F__)
// The part of the next pass's sixteen rows that matches iteration j of this pass (see accumulate_rows),
// fetched into L2 rather than L1: int8 experts + LM head of 8 layers, in-process A/B, 2.56 -> 2.08 ms
// (best of 200). Likely why: L1's few miss buffers are busy with the sixteen rows' own loads.
template <typename W>
inline void fetch_next_pass(const char* next, int64_t j) {
  const char* p = next + j * kRows * static_cast<int64_t>(sizeof(W));
  for (int l = 0; l < 4 * static_cast<int>(sizeof(W)); ++l) _mm_prefetch(p + 64 * l, _MM_HINT_T1);
}
#endif

template <typename W>
void accumulate_rows(const float* x, int64_t m, int64_t D, const W* w, int64_t F, int64_t d0, int64_t d1,
                     float* acc) {
  int64_t d = d0;
  for (; d + kRows <= d1; d += kRows) {
    const W* __restrict r = w + d * F;
    int64_t j = 0;
#if defined(__AVX512F__)
    // Short rows (an int8 expert's w2: 512 bytes a row at dim 512; float32 KV projections, 4 KiB at
    // Mixtral's 8 KV heads of 128): each pass
    // reads sixteen rows too short for the hardware prefetcher to ramp up, so the next pass's region
    // (contiguous) is fetched while this one is summed, 4 * sizeof(W) lines an iteration. int8 1792 x 512
    // went from 12 to 48 GB/s; with float32 rows up to 4 KiB too, the float32 decode's products took ~4%
    // less time. Long rows (the LM head's, a float32 expert's w1) stream as well without it.
    const bool fetch_next = F * static_cast<int64_t>(sizeof(W)) <= 4096 && d + 2 * kRows <= d1;
    const char* next = reinterpret_cast<const char*>(r + kRows * F);
    if (m == 1) {  // batch-1 decode: x's sixteen values stay in registers for the whole pass
      __m512 xv[kRows];
      for (int k = 0; k < kRows; ++k) xv[k] = _mm512_set1_ps(x[d + k]);
      for (; j + 16 <= F; j += 16) {
        if (fetch_next) fetch_next_pass<W>(next, j);
        __m512 s = _mm512_loadu_ps(acc + j), t = _mm512_setzero_ps();
        for (int k = 0; k < kRows; k += 2) {
          s = _mm512_fmadd_ps(xv[k], load16(r + k * F + j), s);
          t = _mm512_fmadd_ps(xv[k + 1], load16(r + (k + 1) * F + j), t);
        }
        _mm512_storeu_ps(acc + j, _mm512_add_ps(s, t));
      }
    } else {  // the weights stay in registers while every row of x passes over them
      for (; j + 16 <= F; j += 16) {
        if (fetch_next) fetch_next_pass<W>(next, j);
        __m512 wv[kRows];
        for (int k = 0; k < kRows; ++k) wv[k] = load16(r + k * F + j);
        for (int64_t i = 0; i < m; ++i) {
          const float* xi = x + i * D + d;
          float* a = acc + i * F + j;
          __m512 s = _mm512_loadu_ps(a), t = _mm512_setzero_ps();
          for (int k = 0; k < kRows; k += 2) {
            s = _mm512_fmadd_ps(_mm512_set1_ps(xi[k]), wv[k], s);
            t = _mm512_fmadd_ps(_mm512_set1_ps(xi[k + 1]), wv[k + 1], t);
          }
          _mm512_storeu_ps(a, _mm512_add_ps(s, t));
        }
      }
    }
#endif
    for (; j < F; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = x + i * D + d;
        float s = 0.0f;
        for (int64_t k = 0; k < kRows; ++k) s += xi[k] * to_float(r[k * F + j]);
        acc[i * F + j] += s;
      }
    }
  }
  for (; d < d1; ++d) {
    const W* __restrict r = w + d * F;
    for (int64_t i = 0; i < m; ++i) {
      const float xd = x[i * D + d];
      float* __restrict a = acc + i * F;
      for (int64_t j = 0; j < F; ++j) a[j] += xd * to_float(r[j]);
    }
  }
}

// Row chunks per product: one per thread (claimed, not assigned: a late worker's is taken by another;
// not two, since a chunk's first pass starts cold and the int8 decode's products took ~5% less time
// with half as many), each at least 64 rows, and few enough that their partial sums (m x F floats
// each, added up by the caller) stay under a quarter of the weight's own bytes: many cores and 16 rows
// of a wide LM head would otherwise write and re-read more partial sums than weights.
int64_t row_chunks(int64_t D, int64_t threads, int64_t m, int64_t F, int64_t weight_bytes) {
  const int64_t by_size = weight_bytes / 4 / std::max<int64_t>(1, m * F * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(1, std::min({threads, D / 64, by_size}));
}

struct Matrix {  // one weight matrix (D, F) in its stored dtype, with optional per-column scales
  const void* data;
  ffi::DataType dtype;
  int64_t D, F;
  const float* scale;
};

// fn(W{}) with W the element type a weight dtype is read as (bfloat16 as its 16 bits); nothing for others.
template <typename Fn>
void with_weight_type(ffi::DataType t, Fn&& fn) {
  switch (t) {
    case ffi::DataType::F32:
      return fn(float{});
    case ffi::DataType::BF16:
      return fn(uint16_t{});
    case ffi::DataType::S8:
      return fn(int8_t{});
    default:
      return;
  }
}

void accumulate_any(const float* x, int64_t m, const Matrix& w, int64_t d0, int64_t d1, float* acc) {
  with_weight_type(w.dtype, [&](auto tag) {
    using W = decltype(tag);
    accumulate_rows(x, m, w.D, static_cast<const W*>(w.data), w.F, d0, d1, acc);
  });
}

bool supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::S8;
}

// Several products y_k (m_k, F_k) = x_k @ w_k in one parallel region (one wait for all of them): each
// product's rows split into chunks with their own partial sums, added up (and scaled) at the end.
struct Product {
  const float* x;
  int64_t m;
  Matrix w;
  float* y;
};

void run_products(const std::vector<Product>& products) {
  const int64_t threads = Workers::get().size();
  struct Chunk {
    int64_t product, d0, d1;
    float* acc;
  };
  std::vector<int64_t> n_chunks(products.size()), first(products.size());
  int64_t total = 0, floats = 0;
  for (size_t p = 0; p < products.size(); ++p) {
    const Product& pr = products[p];
    n_chunks[p] = row_chunks(pr.w.D, threads, pr.m, pr.w.F,
                             pr.w.D * pr.w.F * static_cast<int64_t>(ffi::ByteWidth(pr.w.dtype)));
    first[p] = total;
    total += n_chunks[p];
    floats += n_chunks[p] * products[p].m * products[p].w.F;
  }
  std::vector<float> partial(static_cast<size_t>(floats), 0.0f);
  std::vector<Chunk> chunks;
  chunks.reserve(total);
  float* next = partial.data();
  for (size_t p = 0; p < products.size(); ++p) {
    const Product& pr = products[p];
    const int64_t groups = pr.w.D / kRows;
    for (int64_t c = 0; c < n_chunks[p]; ++c) {
      const int64_t d0 = groups * c / n_chunks[p] * kRows;
      const int64_t d1 = c + 1 == n_chunks[p] ? pr.w.D : groups * (c + 1) / n_chunks[p] * kRows;
      chunks.push_back({static_cast<int64_t>(p), d0, d1, next});
      next += pr.m * pr.w.F;
    }
  }
  parallel_for(total, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const Product& pr = products[ch.product];
    accumulate_any(pr.x, pr.m, pr.w, ch.d0, ch.d1, ch.acc);
  });
  for (size_t p = 0; p < products.size(); ++p) {
    const Product& pr = products[p];
    const int64_t size = pr.m * pr.w.F;
    if (size == 0) continue;
    float* __restrict y = pr.y;
    std::memcpy(y, chunks[first[p]].acc, sizeof(float) * size);
    for (int64_t c = 1; c < n_chunks[p]; ++c) {
      const float* __restrict a = chunks[first[p] + c].acc;
      for (int64_t k = 0; k < size; ++k) y[k] += a[k];
    }
    if (pr.w.scale != nullptr) {
      for (int64_t i = 0; i < pr.m; ++i) {
        for (int64_t j = 0; j < pr.w.F; ++j) y[i * pr.w.F + j] *= pr.w.scale[j];
      }
    }
  }
}

// Scales are float32, one per output column of every matrix, exactly when the weights are int8.
bool scales_fit(const ffi::AnyBuffer& s, ffi::DataType weights, int64_t columns) {
  if (weights != ffi::DataType::S8) return s.element_count() == 0;
  return s.element_type() == ffi::DataType::F32 && static_cast<int64_t>(s.element_count()) == columns;
}

const float* scale_or_null(const ffi::AnyBuffer& s) {
  return s.element_count() == 0 ? nullptr : static_cast<const float*>(s.untyped_data());
}

// ---------------------------------------------------------------------------------------------
// mixtral_matvec: y_i (m, F_i) = x (m, D) @ w_i (D, F_i) [* scale_i (F_i,)] for one or more weights
// (w_1, scale_1, w_2, scale_2, ...; scales empty for float weights): the attention's three projections of
// one x in one parallel region, not three.

ffi::Error MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights, ffi::RemainingRets ys) {
  auto xd = x.dimensions();
  const size_t n = ys.size();
  if (xd.size() != 2 || n == 0 || weights.size() != 2 * n) {
    return ffi::Error::InvalidArgument("mixtral_matvec: expects x (m, D) and a (w, scale) pair per result");
  }
  std::vector<Product> products;
  for (size_t i = 0; i < n; ++i) {
    auto w = weights.get<ffi::AnyBuffer>(2 * i);
    auto scale = weights.get<ffi::AnyBuffer>(2 * i + 1);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !scale.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("mixtral_matvec: weights and scales are arrays, results float32");
    }
    auto wd = w->dimensions();
    auto yd = (*y)->dimensions();
    if (wd.size() != 2 || xd[1] != wd[0] || !supported(w->element_type()) ||
        !scales_fit(*scale, w->element_type(), wd[1]) || yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[1]) {
      return ffi::Error::InvalidArgument(
          "mixtral_matvec: expects x (m, D) float32, each w (D, F) f32/bf16/s8 with F float32 scales exactly for "
          "s8, and each result (m, F)");
    }
    Matrix m{w->untyped_data(), w->element_type(), wd[0], wd[1], scale_or_null(*scale)};
    products.push_back(Product{x.typed_data(), xd[0], m, (*y)->typed_data()});
  }
  run_products(products);
  return ffi::Error::Success();
}

#if defined(__AVX512F__)
// e^x, 16 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (relative error
// < 2e-7 there), times 2^n. x is clamped to [-104, 88]: below, e^x is under float32's smallest denormal
// (0 here); above, it would overflow. A NaN stays NaN (max/min return their second operand for one). The softmax's and SiLU's exps, vectorized: glibc's scalar expf
// was most of a long cache's attention time, and ~15 us of each MoE layer.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));  // NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: exact n*hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

// h1[i] = silu(h1[i]) * h3[i]: the SwiGLU between an expert's up and down projections.
void swiglu(float* __restrict h1, const float* __restrict h3, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 a = _mm512_loadu_ps(h1 + i);
    const __m512 silu = _mm512_div_ps(a, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
    _mm512_storeu_ps(h1 + i, _mm512_mul_ps(silu, _mm512_loadu_ps(h3 + i)));
  }
#endif
  for (; i < n; ++i) h1[i] = h1[i] / (1.0f + std::exp(-h1[i])) * h3[i];
}

// ---------------------------------------------------------------------------------------------
// mixtral_moe: the experts' SwiGLU for a few tokens, reading only the experts they use.
// x (m, D); ids, gates (m, K); w1, w3 (E, D, F) with scales (E, F); w2 (E, F, D) with scales (E, D).
// out[t] = sum_k gates[t, k] * (silu(x_t @ w1[e]) * (x_t @ w3[e])) @ w2[e],  e = ids[t, k].

Matrix expert(const ffi::AnyBuffer& w, const ffi::AnyBuffer& s, int64_t e) {
  auto d = w.dimensions();
  const int64_t bytes = static_cast<int64_t>(ffi::ByteWidth(w.element_type())) * d[1] * d[2];
  const float* scale = scale_or_null(s);
  return Matrix{static_cast<const char*>(w.untyped_data()) + e * bytes, w.element_type(), d[1], d[2],
                scale == nullptr ? nullptr : scale + e * d[2]};
}

ffi::Error MoeImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids,
                   ffi::Buffer<ffi::F32> gates, ffi::AnyBuffer w1, ffi::AnyBuffer s1, ffi::AnyBuffer w3,
                   ffi::AnyBuffer s3, ffi::AnyBuffer w2, ffi::AnyBuffer s2, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  auto idd = ids.dimensions();
  auto gd = gates.dimensions();
  auto w1d = w1.dimensions();
  auto w3d = w3.dimensions();
  auto w2d = w2.dimensions();
  if (xd.size() != 2 || idd.size() != 2 || gd.size() != 2 || w1d.size() != 3 || w3d.size() != 3 ||
      w2d.size() != 3) {
    return ffi::Error::InvalidArgument("mixtral_moe: expects x, ids, gates 2-D and w1, w3, w2 3-D");
  }
  const int64_t m = xd[0], D = xd[1], K = idd[1], E = w1d[0], F = w1d[2];
  const ffi::DataType t = w1.element_type();
  if (idd[0] != m || gd[0] != m || gd[1] != K || w1d[1] != D || w3d[0] != E || w3d[1] != D || w3d[2] != F ||
      w2d[0] != E || w2d[1] != F || w2d[2] != D || !supported(t) || w3.element_type() != t ||
      w2.element_type() != t || !scales_fit(s1, t, E * F) || !scales_fit(s3, t, E * F) ||
      !scales_fit(s2, t, E * D)) {
    return ffi::Error::InvalidArgument(
        "mixtral_moe: expects x (m, D), ids and gates (m, K), w1/w3 (E, D, F) and w2 (E, F, D) of one dtype, "
        "float32 scales exactly for s8");
  }
  const int32_t* id = ids.typed_data();
  const float* gate = gates.typed_data();
  const float* xs = x.typed_data();

  // Tokens grouped by expert: each used expert's rows gathered once, its weights read once.
  std::vector<std::vector<int64_t>> copies(static_cast<size_t>(E));  // flat (token, k) indices
  for (int64_t c = 0; c < m * K; ++c) {
    const int32_t e = id[c];
    if (e < 0 || e >= E) return ffi::Error::InvalidArgument("mixtral_moe: expert id out of range");
    if (gate[c] == 0.0f) continue;  // a padding token's copy (moe.without_padding): adds exactly 0
    copies[e].push_back(c);
  }
  struct Group {
    int64_t e, rows;
    std::vector<float> x, h1, h3, y;
  };
  std::vector<Group> groups;
  for (int64_t e = 0; e < E; ++e) {
    if (copies[e].empty()) continue;
    Group g{e, static_cast<int64_t>(copies[e].size()), {}, {}, {}, {}};
    g.x.resize(g.rows * D);
    for (int64_t r = 0; r < g.rows; ++r) std::memcpy(&g.x[r * D], xs + (copies[e][r] / K) * D, sizeof(float) * D);
    g.h1.resize(g.rows * F);
    g.h3.resize(g.rows * F);
    g.y.resize(g.rows * D);
    groups.push_back(std::move(g));
  }
  std::vector<Product> up;
  for (Group& g : groups) {
    up.push_back({g.x.data(), g.rows, expert(w1, s1, g.e), g.h1.data()});
    up.push_back({g.x.data(), g.rows, expert(w3, s3, g.e), g.h3.data()});
  }
  run_products(up);
  std::vector<Product> down;
  for (Group& g : groups) {
    swiglu(g.h1.data(), g.h3.data(), g.rows * F);
    down.push_back({g.h1.data(), g.rows, expert(w2, s2, g.e), g.y.data()});
  }
  run_products(down);
  float* o = out->typed_data();
  std::fill(o, o + m * D, 0.0f);
  for (const Group& g : groups) {
    for (int64_t r = 0; r < g.rows; ++r) {
      const int64_t c = copies[g.e][r];
      const float gw = gate[c];
      float* __restrict dst = o + (c / K) * D;
      const float* __restrict src = &g.y[r * D];
      for (int64_t j = 0; j < D; ++j) dst[j] += gw * src[j];
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// mixtral_attend: grouped-query attention for a few queries over a cache, as mixtral_jax.model.attention's
// `plain` computes it: out[b, t, h] = sum_s p[s] * v_scale[s] * v[b, kh, s] with
// p = softmax_s(mask[b, t, s] ? q[b, t, h] . k[b, kh, s] / sqrt(x) * k_scale[s] : float32 min), kh the
// head's KV head. Slots the mask hides are never read (a long cache's unwritten tail costs nothing);
// a row that hides every slot averages them all, as the softmax of equal scores does.
// q (b, t, h, x) float32; k, v (b, kh, s, x) float32/bfloat16/int8; scales (b, kh, s) float32 exactly
// for int8; mask (b, t, s) bool.

template <typename W>
inline float dot(const float* q, const W* k, int64_t n) {
  int64_t i = 0;
  float total = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) total += q[i] * to_float(k[i]);
  return total;
}

template <typename W>
void attend_one(const float* q, int64_t g, const W* k, const W* v, const float* ks, const float* vs,
                const bool* mask, int64_t S, int64_t X, float* out, std::vector<float>& scores) {
  // q: g query rows of X (one KV head's group, one query position); out: g rows of X.
  constexpr float kNeg = -3.4028234663852886e38f;  // float32 min, attention.py's _NEG
  const float scale = 1.0f / std::sqrt(static_cast<float>(X));
  scores.assign(static_cast<size_t>(g * S), kNeg);
  bool any = false;
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    any = true;
    const W* kr = k + s * X;
    for (int64_t r = 0; r < g; ++r) {
      float sc = dot(q + r * X, kr, X) * scale;
      scores[r * S + s] = ks == nullptr ? sc : sc * ks[s];
    }
  }
  std::fill(out, out + g * X, 0.0f);
  for (int64_t r = 0; r < g; ++r) {
    float* sr = &scores[r * S];
    float* o = out + r * X;
    if (!any) {  // every slot hidden: equal scores, equal weights
      const float p = 1.0f / static_cast<float>(S);
      for (int64_t s = 0; s < S; ++s) {
        const float w = vs == nullptr ? p : p * vs[s];
        const W* vr = v + s * X;
        for (int64_t i = 0; i < X; ++i) o[i] += w * to_float(vr[i]);
      }
      continue;
    }
    float top = kNeg;
    for (int64_t s = 0; s < S; ++s) top = mask[s] ? std::max(top, sr[s]) : top;
    float total = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      if (!mask[s]) continue;
      sr[s] = std::exp(sr[s] - top);
      total += sr[s];
    }
    for (int64_t s = 0; s < S; ++s) {
      if (!mask[s]) continue;
      const float p = sr[s] / total;
      const float w = vs == nullptr ? p : p * vs[s];
      const W* vr = v + s * X;
      for (int64_t i = 0; i < X; ++i) o[i] += w * to_float(vr[i]);
    }
  }
}

#if defined(__AVX512F__)
inline void load_row(const float* p, __m512* out, int nv) {
  for (int i = 0; i < nv; ++i) out[i] = _mm512_loadu_ps(p + 16 * i);
}
template <typename W>
inline void load_row(const W* p, __m512* out, int nv) {
  for (int i = 0; i < nv; ++i) out[i] = load16(p + 16 * i);
}

// attend_one's numbers for R query rows of NV * 16 dimensions at a time, with at least one slot shown:
// each key and value row is loaded once for the R rows, the query rows and the outputs stay in
// registers, and the softmax's exps are taken sixteen slots at a time.
template <int NV, int R, typename W>
void attend_rows(const float* q, int64_t g, const W* k, const W* v, const float* ks, const float* vs,
                 const bool* mask, int64_t S, float* out, std::vector<float>& scores) {
  constexpr int64_t X = NV * 16;
  constexpr float kNeg = -3.4028234663852886e38f;
  const float scale = 1.0f / std::sqrt(static_cast<float>(X));
  const int64_t padded = (S + 15) / 16 * 16;
  scores.resize(static_cast<size_t>(R * padded));
  for (int64_t r0 = 0; r0 < g; r0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, g - r0));
    __m512 qv[R][NV];
    for (int r = 0; r < R; ++r) load_row(q + (r0 + std::min(r, rows - 1)) * X, qv[r], NV);
    float top[R];
    for (int r = 0; r < R; ++r) top[r] = kNeg;
    for (int64_t s = 0; s < S; ++s) {
      if (!mask[s]) {
        for (int r = 0; r < R; ++r) scores[r * padded + s] = -INFINITY;
        continue;
      }
      __m512 kv[NV];
      load_row(k + s * X, kv, NV);
      const float f = ks == nullptr ? scale : scale * ks[s];
      for (int r = 0; r < R; ++r) {
        __m512 a = _mm512_mul_ps(qv[r][0], kv[0]);
        for (int i = 1; i < NV; ++i) a = _mm512_fmadd_ps(qv[r][i], kv[i], a);
        const float sc = _mm512_reduce_add_ps(a) * f;
        scores[r * padded + s] = sc;
        top[r] = std::max(top[r], sc);
      }
    }
    float inv_total[R];
    for (int r = 0; r < R; ++r) {
      float* sr = &scores[r * padded];
      for (int64_t s = S; s < padded; ++s) sr[s] = -INFINITY;
      const __m512 t = _mm512_set1_ps(top[r]);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t s = 0; s < padded; s += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + s), t));
        _mm512_storeu_ps(sr + s, e);
        sum = _mm512_add_ps(sum, e);
      }
      inv_total[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < S; ++s) {
      if (!mask[s]) continue;
      __m512 vv[NV];
      load_row(v + s * X, vv, NV);
      const float f = vs == nullptr ? 1.0f : vs[s];
      for (int r = 0; r < R; ++r) {
        const __m512 p = _mm512_set1_ps(scores[r * padded + s] * f);
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(p, vv[i], acc[r][i]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(inv_total[r]);
      for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + (r0 + r) * X + 16 * i, _mm512_mul_ps(acc[r][i], inv));
    }
  }
}
#endif

#if defined(__AVX512F__)
// attend_rows with blocks of at most kMaxRows rows (registers: 4, or 2 at head size 128), fewer where the
// group of query heads is smaller.
template <int NV, int kMaxRows, typename W>
void attend_blocks(const float* q, int64_t g, const W* k, const W* v, const float* ks, const float* vs,
                   const bool* mask, int64_t S, float* out, std::vector<float>& scores) {
  if (g == 1) return attend_rows<NV, 1>(q, g, k, v, ks, vs, mask, S, out, scores);
  if (g == 2 || kMaxRows == 2) return attend_rows<NV, 2>(q, g, k, v, ks, vs, mask, S, out, scores);
  attend_rows<NV, 4>(q, g, k, v, ks, vs, mask, S, out, scores);
}
#endif

// attend_rows where it applies (AVX-512, a head size of 16, 32, 64 or 128, a slot shown), else attend_one.
template <typename W>
void attend_group(const float* q, int64_t g, const W* k, const W* v, const float* ks, const float* vs,
                  const bool* mask, int64_t S, int64_t X, float* out, std::vector<float>& scores) {
#if defined(__AVX512F__)
  if (std::any_of(mask, mask + S, [](bool m) { return m; })) {
    switch (X) {
      case 16:
        return attend_blocks<1, 4>(q, g, k, v, ks, vs, mask, S, out, scores);
      case 32:
        return attend_blocks<2, 4>(q, g, k, v, ks, vs, mask, S, out, scores);
      case 64:
        return attend_blocks<4, 4>(q, g, k, v, ks, vs, mask, S, out, scores);
      case 128:
        return attend_blocks<8, 2>(q, g, k, v, ks, vs, mask, S, out, scores);
      default:
        break;
    }
  }
#endif
  attend_one(q, g, k, v, ks, vs, mask, S, X, out, scores);
}

ffi::Error AttendImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer ks,
                      ffi::AnyBuffer vs, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto md = mask.dimensions();
  const ffi::DataType t = k.element_type();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 || v.dimensions().size() != 4 || !supported(t) ||
      v.element_type() != t) {
    return ffi::Error::InvalidArgument(
        "mixtral_attend: expects q (b, t, h, x) float32, k and v (b, kh, s, x) of one dtype, mask (b, t, s)");
  }
  const int64_t B = qd[0], T = qd[1], H = qd[2], X = qd[3], KH = kd[1], S = kd[2];
  auto vd = v.dimensions();
  if (kd[0] != B || kd[3] != X || KH == 0 || H % KH != 0 || vd[0] != B || vd[1] != KH || vd[2] != S ||
      vd[3] != X || md[0] != B || md[1] != T || md[2] != S || !scales_fit(ks, t, B * KH * S) ||
      !scales_fit(vs, t, B * KH * S)) {
    return ffi::Error::InvalidArgument(
        "mixtral_attend: shapes disagree (q (b, t, h, x), k/v (b, kh, s, x) with kh dividing h, mask (b, t, s), "
        "float32 scales (b, kh, s) exactly for int8)");
  }
  const int64_t G = H / KH;
  const float* qs = q.typed_data();
  const bool* m = mask.typed_data();
  const float* k_scale = scale_or_null(ks);
  const float* v_scale = scale_or_null(vs);
  float* o = out->typed_data();
  const int64_t bytes = static_cast<int64_t>(ffi::ByteWidth(t));
  const char* kbase = static_cast<const char*>(k.untyped_data());
  const char* vbase = static_cast<const char*>(v.untyped_data());
  // One task per (batch row, query position, KV head): its group of query heads is contiguous in q.
  parallel_for(B * T * KH, [&](int64_t task) {
    const int64_t h = task % KH, ti = (task / KH) % T, bi = task / (KH * T);
    const int64_t cache = (bi * KH + h) * S;  // this head's first slot
    const float* qrow = qs + ((bi * T + ti) * H + h * G) * X;
    float* orow = o + ((bi * T + ti) * H + h * G) * X;
    const bool* mrow = m + (bi * T + ti) * S;
    const float* ksc = k_scale == nullptr ? nullptr : k_scale + cache;
    const float* vsc = v_scale == nullptr ? nullptr : v_scale + cache;
    thread_local std::vector<float> scores;
    with_weight_type(t, [&](auto tag) {
      using W = decltype(tag);
      attend_group(qrow, G, reinterpret_cast<const W*>(kbase + cache * X * bytes),
                 reinterpret_cast<const W*>(vbase + cache * X * bytes), ksc, vsc, mrow, S, X, orow, scores);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralMatvec, MatvecImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralMoe, MoeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralAttend, AttendImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
