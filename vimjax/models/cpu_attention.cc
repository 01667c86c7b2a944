// Fused softmax attention for XLA:CPU (vimjax/models/cpu_attention.py builds and
// registers it through jax.ffi).
//
// Why: at head_dim 32, XLA:CPU runs attention's batched matmuls at 50-80 GFLOP/s
// and writes every [b, heads, q, k] intermediate to memory (BUILD_NOTES.md,
// "Speed (issue 13)"). Here each (example, head) pair is one task: its q, k, v
// rows are gathered from the [b, length, heads, head_dim] layout into cache-sized
// blocks, a few query rows at a time (Rows<D>) go through logits -> softmax -> output without
// leaving L1, and the backward pass recomputes the probabilities from the saved
// log-sum-exp (flash attention's scheme), so no [q, k] tensor is ever stored.
//
// The matmuls are register-blocked loops over cpu_kernels.h's vectors; tasks are
// spread over XLA's intra-op thread pool.
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace vimjax;  // NOLINT: the kernels' vector helpers.

constexpr int kKeyBlock = 32;  // Key lengths must be multiples of this (two vectors).
constexpr int kQueryBlock = 8;  // Query lengths: multiples of every Rows<D>().

// Rows per block: R x D/16 accumulators stay in registers.
template <int D> constexpr int Rows() { return D <= 32 ? 8 : D <= 64 ? 4 : 2; }

// out[R][n] = epilogue(r, j, a[R][D] x bt[D][n])  (bt: a [n, D] matrix transposed;
// n % 32 == 0). The epilogue sees each row's 16-column vectors while they are in
// registers (softmax's max, exp and gradient without passes of their own).
template <int D, int R, typename Epilogue>
inline void times_transposed(const float* a, const float* bt, int n, float* out,
                             Epilogue epilogue) {
  for (int j = 0; j < n; j += kKeyBlock) {
    v16 acc[R][2] = {};
    for (int k = 0; k < D; ++k) {
      v16 b0 = load(bt + k * n + j), b1 = load(bt + k * n + j + kLanes);
      for (int r = 0; r < R; ++r) {
        v16 s = splat(a[r * D + k]);
        acc[r][0] += s * b0;
        acc[r][1] += s * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(out + r * n + j, epilogue(r, j, acc[r][0]));
      store(out + r * n + j + kLanes, epilogue(r, j + kLanes, acc[r][1]));
    }
  }
}

// out[R][D] = row_scale[r] * (p[R][n] x b[n][D]). The accumulators are locals, so
// they stay in registers (through a reference, every FMA was stored back).
template <int D, int R>
inline void times(const float* p, const float* b, int n, const float* row_scale, float* out) {
  v16 acc[R][D / kLanes] = {};
  for (int k = 0; k < n; ++k) {
    v16 row[D / kLanes];
    for (int c = 0; c < D / kLanes; ++c) row[c] = load(b + k * D + c * kLanes);
    for (int r = 0; r < R; ++r) {
      v16 s = splat(p[r * n + k]);
      for (int c = 0; c < D / kLanes; ++c) acc[r][c] += s * row[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < D / kLanes; ++c)
      store(out + r * D + c * kLanes, acc[r][c] * splat(row_scale[r]));
}

// g[n][D] += p[R][n]^T x x[R][D]  (x's R rows held in registers).
template <int D, int R>
inline void add_transposed_times(const float* p, const float* x, int n, float* g) {
  v16 rows[R][D / kLanes];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < D / kLanes; ++c) rows[r][c] = load(x + r * D + c * kLanes);
  for (int j = 0; j < n; ++j) {
    v16 acc[D / kLanes];
    for (int c = 0; c < D / kLanes; ++c) acc[c] = load(g + j * D + c * kLanes);
    for (int r = 0; r < R; ++r) {
      v16 s = splat(p[r * n + j]);
      for (int c = 0; c < D / kLanes; ++c) acc[c] += s * rows[r][c];
    }
    for (int c = 0; c < D / kLanes; ++c) store(g + j * D + c * kLanes, acc[c]);
  }
}

// One (example, head) slice of a [b, length, heads, D] array.
struct Slice {
  int64_t offset, stride;  // Of row 0, between rows (heads * D).
  int length;
};

// Copies one slice into rows [length][D] and / or columns [D][length], times `scale`.
template <int D>
void gather(const float* x, Slice s, float* rows, float* columns, float scale = 1.f) {
  for (int i = 0; i < s.length; ++i) {
    const float* src = x + s.offset + i * s.stride;
    if (rows)
      for (int c = 0; c < D / kLanes; ++c)
        store(rows + i * D + c * kLanes, load(src + c * kLanes) * splat(scale));
    if (columns)
      for (int k = 0; k < D; ++k) columns[k * s.length + i] = src[k] * scale;
  }
}

template <int D>
void scatter(const float* rows, Slice s, float* x, float scale = 1.f) {
  for (int i = 0; i < s.length; ++i)
    for (int c = 0; c < D / kLanes; ++c)
      store(x + s.offset + i * s.stride + c * kLanes, load(rows + i * D + c * kLanes) * splat(scale));
}

struct Shape {
  int64_t batch, q_len, kv_len, heads, head_dim;
  Slice q(int64_t task) const { return slice(task, q_len); }
  Slice kv(int64_t task) const { return slice(task, kv_len); }
  Slice slice(int64_t task, int64_t length) const {
    int64_t b = task / heads, h = task % heads;
    return {(b * length * heads + h) * head_dim, heads * head_dim, static_cast<int>(length)};
  }
};

// Forward of one (example, head): out = softmax(scale q k^T) v, lse = log-sum-exp of
// the logits. The scale is applied as q is gathered (no pass of its own).
template <int D>
void forward_task(const float* q, const float* k, const float* v, float* out, float* lse,
                  float scale, const Shape& shape, int64_t task, float* work) {
  constexpr int R = Rows<D>();
  const int n_q = shape.q_len, n_k = shape.kv_len;
  float *qs = work, *kt = qs + n_q * D, *vs = kt + n_k * D, *os = vs + n_k * D,
        *p = os + n_q * D;
  gather<D>(q, shape.q(task), qs, nullptr, scale);
  gather<D>(k, shape.kv(task), nullptr, kt);
  gather<D>(v, shape.kv(task), vs, nullptr);
  float* task_lse = lse + task * n_q;
  for (int i = 0; i < n_q; i += R) {
    v16 row_max[R];
    for (int r = 0; r < R; ++r) row_max[r] = splat(-INFINITY);
    times_transposed<D, R>(qs + i * D, kt, n_k, p, [&](int r, int, v16 x) {
      row_max[r] = row_max[r] > x ? row_max[r] : x;
      return x;
    });
    float inverse_total[R];
    for (int r = 0; r < R; ++r) {
      float* row = p + r * n_k;
      float max = reduce_max(row_max[r]);
      v16 sum = splat(0.f);
      for (int j = 0; j < n_k; j += kLanes) {
        v16 e = vexp(load(row + j) - splat(max));
        store(row + j, e);
        sum += e;
      }
      float total = reduce_sum(sum);
      inverse_total[r] = 1.f / total;
      task_lse[i + r] = max + std::log(total);
    }
    times<D, R>(p, vs, n_k, inverse_total, os + i * D);
  }
  scatter<D>(os, shape.q(task), out);
}

// Backward of one (example, head), probabilities recomputed from lse:
// dv = p^T do, dp = do v^T, ds = p (dp - rowsum(do * o)), dq = scale ds k,
// dk = ds^T (scale q).
template <int D>
void backward_task(const float* q, const float* k, const float* v, const float* out,
                   const float* lse, const float* dout, float* dq, float* dk, float* dv,
                   float scale, const Shape& shape, int64_t task, float* work) {
  constexpr int R = Rows<D>();
  const int n_q = shape.q_len, n_k = shape.kv_len;
  float *qs = work, *dos = qs + n_q * D, *os = dos + n_q * D, *dqs = os + n_q * D,
        *ks = dqs + n_q * D, *kt = ks + n_k * D, *vt = kt + n_k * D, *dks = vt + n_k * D,
        *dvs = dks + n_k * D, *p = dvs + n_k * D, *ds = p + R * n_k;
  gather<D>(q, shape.q(task), qs, nullptr, scale);
  gather<D>(dout, shape.q(task), dos, nullptr);
  gather<D>(out, shape.q(task), os, nullptr);
  gather<D>(k, shape.kv(task), ks, kt);
  gather<D>(v, shape.kv(task), nullptr, vt);
  std::memset(dks, 0, sizeof(float) * n_k * D);
  std::memset(dvs, 0, sizeof(float) * n_k * D);
  const float* task_lse = lse + task * n_q;
  float ones[R];
  std::fill(ones, ones + R, 1.f);
  for (int i = 0; i < n_q; i += R) {
    float delta[R];  // rowsum(do * o) = rowsum(dp * p).
    for (int r = 0; r < R; ++r) {
      v16 dot = splat(0.f);
      for (int c = 0; c < D / kLanes; ++c)
        dot += load(dos + (i + r) * D + c * kLanes) * load(os + (i + r) * D + c * kLanes);
      delta[r] = reduce_sum(dot);
    }
    const float* log_total = task_lse + i;
    times_transposed<D, R>(qs + i * D, kt, n_k, p, [&](int r, int, v16 x) {
      return vexp(x - splat(log_total[r]));
    });
    times_transposed<D, R>(dos + i * D, vt, n_k, ds, [&](int r, int j, v16 x) {
      return load(p + r * n_k + j) * (x - splat(delta[r]));
    });
    times<D, R>(ds, ks, n_k, ones, dqs + i * D);
    add_transposed_times<D, R>(p, dos + i * D, n_k, dvs);
    add_transposed_times<D, R>(ds, qs + i * D, n_k, dks);
  }
  scatter<D>(dqs, shape.q(task), dq, scale);
  scatter<D>(dks, shape.kv(task), dk);
  scatter<D>(dvs, shape.kv(task), dv);
}

ffi::Error check(const Shape& s) {
  if (s.head_dim != 16 && s.head_dim != 32 && s.head_dim != 64)
    return ffi::Error::InvalidArgument("cpu_attention: head_dim " + std::to_string(s.head_dim) +
                                       "; valid: 16, 32, 64.");
  if (s.kv_len % kKeyBlock != 0 || s.q_len % kQueryBlock != 0)
    return ffi::Error::InvalidArgument(
        "cpu_attention: lengths q=" + std::to_string(s.q_len) + ", k=" +
        std::to_string(s.kv_len) + "; valid: q a multiple of 8, k a multiple of 32.");
  return ffi::Error::Success();
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return {qd[0], qd[1], kd[1], qd[2], qd[3]};
}

template <int D>
size_t forward_work(const Shape& s) {
  return (2 * s.q_len + 2 * s.kv_len) * D + Rows<D>() * s.kv_len;
}
template <int D>
size_t backward_work(const Shape& s) {
  return (4 * s.q_len + 5 * s.kv_len) * D + 2 * Rows<D>() * s.kv_len;
}

// f(std::integral_constant<int, D>()) for the checked head_dim D.
template <typename F>
void with_head_dim(int64_t head_dim, F f) {
  if (head_dim == 16) f(std::integral_constant<int, 16>());
  else if (head_dim == 32) f(std::integral_constant<int, 32>());
  else f(std::integral_constant<int, 64>());
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Shape s = shape_of(q, k);
  if (ffi::Error error = check(s); error.failure()) return error;
  with_head_dim(s.head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    parallel_for(pool, s.batch * s.heads, forward_work<D>(s), [&, s](int64_t task, float* work) {
      forward_task<D>(q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(),
                      lse->typed_data(), scale, s, task, work);
    });
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Shape s = shape_of(q, k);
  if (ffi::Error error = check(s); error.failure()) return error;
  with_head_dim(s.head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    parallel_for(pool, s.batch * s.heads, backward_work<D>(s), [&, s](int64_t task, float* work) {
      backward_task<D>(q.typed_data(), k.typed_data(), v.typed_data(), out.typed_data(),
                       lse.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(),
                       dv->typed_data(), scale, s, task, work);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VimjaxAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [b, q, heads, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [b, k, heads, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [b, k, heads, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [b, q, heads, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [b, heads, q]
                                  .Attr<float>("scale"));  // of the logits

XLA_FFI_DEFINE_HANDLER_SYMBOL(VimjaxAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale"));
