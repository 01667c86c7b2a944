// Helpers shared by vimjax's C++ kernels for XLA:CPU (cpu_attention.cc,
// cpu_layer_norm.cc; vimjax/models/cpu_kernels.py compiles each with this header).
//
// Vectors are GCC vector types of 16 floats: with -march=native they are AVX-512
// registers (or pairs of AVX2 ones). Work is spread over XLA's intra-op thread
// pool by `parallel_for`, one task wholly on one thread in a fixed order, so
// results are deterministic.
#ifndef VIMJAX_MODELS_CPU_KERNELS_H_
#define VIMJAX_MODELS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace vimjax {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

// A memory broadcast (vbroadcastss m32): `(v16){} + x` costs an add and a shuffle.
inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
inline float reduce_sum(v16 v) { float s = 0.f; for (int i = 0; i < kLanes; ++i) s += v[i]; return s; }
inline float reduce_max(v16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) for x <= 0 (softmax arguments), within ~2 ulp:
// x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial, 2^n
// through the exponent bits.
inline v16 vexp(v16 x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;  // exp(-87) ~ 1.6e-38: still normal.
  v16 n = x * splat(1.44269504088896341f);
  n = (n + splat(12582912.f)) - splat(12582912.f);  // Round to nearest (1.5 * 2^23).
  v16 r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);  // Cody-Waite ln2.
  v16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Runs body(task, work) for task in [0, n) on the calling thread and XLA's
// intra-op pool, `work` a per-thread scratch of work_floats floats. Tasks are
// claimed from a counter, so the caller waits only for tasks already running; a
// helper that starts late finds none left.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t n, size_t work_floats, Body body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, work_floats, body] {
    std::vector<float> work;
    for (int64_t task; (task = state->next.fetch_add(1)) < n;) {
      if (work.empty() && work_floats > 0) work.resize(work_floats);
      body(task, work.data());
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace vimjax

#endif  // VIMJAX_MODELS_CPU_KERNELS_H_
