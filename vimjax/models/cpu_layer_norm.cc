// LayerNorm, forward and backward, for XLA:CPU (vimjax/models/cpu_layer_norm.py
// builds and registers it through jax.ffi).
//
// Why: XLA:CPU splits it into several fusions, one pass over memory each, mostly
// on one core: in issue 13's tokenizer step its 18 LayerNorms took ~120 ms of a
// 1.25 s step (BUILD_NOTES.md, "Speed (issue 13)", ninth round). Here each row
// (the feature axis) stays in L1 from its statistics to its output, and blocks of
// rows run on every thread of XLA's intra-op pool.
#include <cmath>
#include <cstdint>
#include <string>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace vimjax;  // NOLINT: the kernels' vector helpers.

// LayerNorm rows per task; the backward pass returns one partial sum of the
// scale's and the bias's gradients per task (summed by the caller, in order).
constexpr int64_t kRowBlock = 64;

// x [..., features] against scale [features] (and the partials' [row blocks, features]).
ffi::Error check_layer_norm(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& scale,
                            int64_t partials) {
  const auto dims = x.dimensions();
  const int64_t dim = scale.element_count();
  if (dims.size() == 0 || dims.back() != dim)
    return ffi::Error::InvalidArgument("cpu_layer_norm: x's feature axis is not scale's " +
                                       std::to_string(dim));
  const int64_t blocks = (x.element_count() / dim + kRowBlock - 1) / kRowBlock;
  if (partials >= 0 && partials != blocks * dim)
    return ffi::Error::InvalidArgument("cpu_layer_norm: gradient partials of " +
                                       std::to_string(partials) + " elements; valid: " +
                                       std::to_string(blocks) + " row blocks of 64 x " +
                                       std::to_string(dim));
  if (dim % kLanes != 0)
    return ffi::Error::InvalidArgument("cpu_layer_norm: feature axis " + std::to_string(dim) +
                                       "; valid: a multiple of 16.");
  return ffi::Error::Success();
}

// y = (x - mean) * rstd * scale + bias over each row of x [rows, features];
// also returns each row's mean and rstd = 1 / sqrt(var + eps).
ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  if (ffi::Error error = check_layer_norm(x, scale, -1); error.failure()) return error;
  const int64_t dim = scale.element_count(), rows = x.element_count() / dim;
  const float *xs = x.typed_data(), *sc = scale.typed_data(), *bi = bias.typed_data();
  float *ys = y->typed_data(), *means = mean->typed_data(), *rstds = rstd->typed_data();
  parallel_for(pool, (rows + kRowBlock - 1) / kRowBlock, 0, [=](int64_t task, float*) {
    for (int64_t r = task * kRowBlock; r < std::min(rows, (task + 1) * kRowBlock); ++r) {
      const float* xr = xs + r * dim;
      v16 sum = splat(0.f);
      for (int64_t j = 0; j < dim; j += kLanes) sum += load(xr + j);
      const float m = reduce_sum(sum) / dim;
      v16 vm = splat(m), squares = splat(0.f);
      for (int64_t j = 0; j < dim; j += kLanes) {
        v16 c = load(xr + j) - vm;
        squares += c * c;
      }
      const float r_std = 1.f / std::sqrt(reduce_sum(squares) / dim + eps);
      v16 vr = splat(r_std);
      for (int64_t j = 0; j < dim; j += kLanes)
        store(ys + r * dim + j, (load(xr + j) - vm) * vr * load(sc + j) + load(bi + j));
      means[r] = m;
      rstds[r] = r_std;
    }
  });
  return ffi::Error::Success();
}

// With x_hat = (x - mean) * rstd and gs = g * scale:
//   dx = rstd * (gs - mean(gs) - x_hat * mean(gs * x_hat))   (per row),
//   d_scale partials = sum over a task's rows of g * x_hat, d_bias partials of g.
ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                             ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> g,
                             ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> d_scale_partials,
                             ffi::ResultBuffer<ffi::F32> d_bias_partials) {
  if (ffi::Error error = check_layer_norm(x, scale, d_scale_partials->element_count());
      error.failure())
    return error;
  const int64_t dim = scale.element_count(), rows = x.element_count() / dim;
  const float *xs = x.typed_data(), *sc = scale.typed_data(), *gs = g.typed_data();
  const float *means = mean.typed_data(), *rstds = rstd.typed_data();
  float *dxs = dx->typed_data(), *ds_all = d_scale_partials->typed_data(),
        *db_all = d_bias_partials->typed_data();
  parallel_for(pool, (rows + kRowBlock - 1) / kRowBlock, 0, [=](int64_t task, float*) {
    float *ds = ds_all + task * dim, *db = db_all + task * dim;
    std::fill(ds, ds + dim, 0.f);
    std::fill(db, db + dim, 0.f);
    for (int64_t r = task * kRowBlock; r < std::min(rows, (task + 1) * kRowBlock); ++r) {
      const float *xr = xs + r * dim, *gr = gs + r * dim;
      v16 vm = splat(means[r]), vr = splat(rstds[r]), sum_gs = splat(0.f), sum_gsx = splat(0.f);
      for (int64_t j = 0; j < dim; j += kLanes) {
        v16 x_hat = (load(xr + j) - vm) * vr, gv = load(gr + j), gsv = gv * load(sc + j);
        sum_gs += gsv;
        sum_gsx += gsv * x_hat;
        store(ds + j, load(ds + j) + gv * x_hat);
        store(db + j, load(db + j) + gv);
      }
      v16 mean_gs = splat(reduce_sum(sum_gs) / dim), mean_gsx = splat(reduce_sum(sum_gsx) / dim);
      for (int64_t j = 0; j < dim; j += kLanes) {
        v16 x_hat = (load(xr + j) - vm) * vr;
        store(dxs + r * dim + j, vr * (load(gr + j) * load(sc + j) - mean_gs - x_hat * mean_gsx));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VimjaxLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., features]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [features]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [features]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [..., features]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean [...]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd [...]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VimjaxLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g (d y)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d scale [row blocks, features]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d bias [row blocks, features]
