// The per-example kernel gradients of a convolution,
//   g_n[i, j, c, o] = Σ_{a, b} x[n, a·sh + i·dh, b·sw + j·dw, c] · d[n, a, b, o],
// x the layer's inputs (padded), d the gradients of its outputs, in the kernel's order
// [kh, kw, in, out], computed one example at a time (TensorFlow takes one batched
// matrix product per kernel offset, slow on CPU for the small matrices of one example):
//
// * InsightPatchGradients: the g_n of the kernel offsets first .. first + count − 1
//   (offset i·kw + j), [B, count · in · out] float; optinsight.per_example's `_offsets`
//   of a `Patches` part, several offsets at once.
// * InsightPatchSquareSums: their elementwise sum of squares over the examples,
//   Σ_n g_n² [kh · kw · in · out] double, without keeping the g_n (`_square_sum`).
//
// Examples are spread over TensorFlow's CPU worker threads. g_n of a small kernel
// (at most kDirect entries, out a multiple of kBlock) is summed over the positions
// kBlock outputs at a time in registers, for up to kBlock input channels at once (or,
// with fewer than kChains channels, kChains positions at once); a larger one is one
// Eigen product g_n = X_nᵀ d_n with X_n the example's patches [positions, offsets · in]
// (im2col).
// Memory per thread: positions · kh·kw·in floats (larger kernels only), and for the
// square sums kh·kw·in·out floats and as many doubles.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "Eigen/Core"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace optinsight {

namespace tf = ::tensorflow;

namespace {

// at most this many kernel entries (in floats, 8 KB): g_n from the inputs directly
constexpr int64_t kDirect = 2048;
constexpr int kBlock = 8;   // outputs summed at once (one AVX register)
constexpr int kChains = 4;  // positions summed at once, into separate sums

// A convolution's geometry, from the inputs, the output gradients and the attrs.
struct Geometry {
  int64_t batch, height, width, in, rows, columns, out, kh, kw, sh, sw, dh, dw;
  int64_t positions() const { return rows * columns; }
};

// g_n[offset (i, j), c0 .. c0 + NC, o0 .. o0 + kBlock) into g (the entry of c0, o0):
// NC input channels side by side, one sum in registers each, over the positions.
template <int NC>
void ChannelBlock(const Geometry& s, const float* image, const float* delta, int64_t i,
                  int64_t j, int64_t c0, int64_t o0, float* g) {
  float sum[NC][kBlock] = {};
  for (int64_t a = 0; a < s.rows; ++a) {
    const float* pixel = image + ((a * s.sh + i * s.dh) * s.width + j * s.dw) * s.in + c0;
    const float* row = delta + a * s.columns * s.out + o0;
    for (int64_t b = 0; b < s.columns; ++b, pixel += s.sw * s.in, row += s.out) {
      for (int c = 0; c < NC; ++c) {
        const float value = pixel[c];
#pragma omp simd
        for (int o = 0; o < kBlock; ++o) sum[c][o] = std::fma(value, row[o], sum[c][o]);
      }
    }
  }
  for (int c = 0; c < NC; ++c) {
    for (int o = 0; o < kBlock; ++o) g[c * s.out + o] = sum[c][o];
  }
}

using BlockFunction = void (*)(const Geometry&, const float*, const float*, int64_t,
                               int64_t, int64_t, int64_t, float*);
constexpr BlockFunction kChannelBlocks[kBlock + 1] = {
    nullptr,          ChannelBlock<1>, ChannelBlock<2>, ChannelBlock<3>, ChannelBlock<4>,
    ChannelBlock<5>, ChannelBlock<6>, ChannelBlock<7>, ChannelBlock<8>};

// Whether g_n of `count` offsets is summed in registers (else from the patches).
bool Direct(const Geometry& s, int64_t count) {
  return count * s.in * s.out <= kDirect && s.out % kBlock == 0;
}

// g_n of the offsets [first, first + count) of one example into `gradient`
// ([count · in, out] row-major); `patches`: scratch of positions · count · in floats
// (the im2col path only).
void ExampleGradient(const Geometry& s, const float* image, const float* delta,
                     int64_t first, int64_t count, float* patches, float* gradient) {
  const bool direct = Direct(s, count);
  if (direct && s.in >= kChains) {
    // up to kBlock channels by kBlock outputs at a time, in registers
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = (first + k) / s.kw, j = (first + k) % s.kw;
      for (int64_t c0 = 0; c0 < s.in; c0 += kBlock) {
        const int64_t channels = std::min<int64_t>(kBlock, s.in - c0);
        for (int64_t o0 = 0; o0 < s.out; o0 += kBlock) {
          kChannelBlocks[channels](s, image, delta, i, j, c0, o0,
                                   gradient + (k * s.in + c0) * s.out + o0);
        }
      }
    }
    return;
  }
  if (direct) {  // few channels: kChains positions at once
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = (first + k) / s.kw, j = (first + k) % s.kw;
      for (int64_t c = 0; c < s.in; ++c) {
        float* g = gradient + (k * s.in + c) * s.out;
        for (int64_t o0 = 0; o0 < s.out; o0 += kBlock) {
          float sum[kChains][kBlock] = {};  // kChains sums, for the FMA latency
          const float* row = delta + o0;
          for (int64_t a = 0; a < s.rows; ++a) {
            const float* pixel = image + ((a * s.sh + i * s.dh) * s.width + j * s.dw) * s.in + c;
            int64_t b = 0;
            for (; b + kChains <= s.columns; b += kChains, row += kChains * s.out) {
              for (int q = 0; q < kChains; ++q) {
                const float value = pixel[(b + q) * s.sw * s.in];
#pragma omp simd
                for (int o = 0; o < kBlock; ++o) {
                  sum[q][o] = std::fma(value, row[q * s.out + o], sum[q][o]);
                }
              }
            }
            for (; b < s.columns; ++b, row += s.out) {
              const float value = pixel[b * s.sw * s.in];
#pragma omp simd
              for (int o = 0; o < kBlock; ++o) {
                sum[0][o] = std::fma(value, row[o], sum[0][o]);
              }
            }
          }
          for (int o = 0; o < kBlock; ++o) {
            g[o0 + o] = (sum[0][o] + sum[1][o]) + (sum[2][o] + sum[3][o]);
          }
        }
      }
    }
    return;
  }
  float* row = patches;  // the patches X_n, and g_n = X_nᵀ d_n in one product
  for (int64_t a = 0; a < s.rows; ++a) {
    for (int64_t b = 0; b < s.columns; ++b) {
      for (int64_t k = 0; k < count; ++k, row += s.in) {
        const int64_t i = (first + k) / s.kw, j = (first + k) % s.kw;
        const float* pixel =
            image + ((a * s.sh + i * s.dh) * s.width + b * s.sw + j * s.dw) * s.in;
        std::copy_n(pixel, s.in, row);
      }
    }
  }
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const Matrix> patches_n(patches, s.positions(), count * s.in);
  Eigen::Map<const Matrix> gradients_n(delta, s.positions(), s.out);
  Eigen::Map<Matrix> gradient_n(gradient, count * s.in, s.out);
  gradient_n.noalias() = patches_n.transpose() * gradients_n;
}

tf::Status KernelSizeShape(tf::shape_inference::InferenceContext* c, int64_t offsets,
                           tf::shape_inference::DimensionHandle* size) {
  TF_RETURN_IF_ERROR(c->Multiply(c->Dim(c->input(0), 3), c->Dim(c->input(1), 3), size));
  return c->Multiply(*size, offsets, size);
}

// Base of both ops: the attrs, and the geometry checked against the inputs.
class PatchOp : public tf::OpKernel {
 public:
  explicit PatchOp(tf::OpKernelConstruction* c) : tf::OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("kernel_size", &kernel_));
    OP_REQUIRES_OK(c, c->GetAttr("strides", &strides_));
    OP_REQUIRES_OK(c, c->GetAttr("dilations", &dilations_));
    OP_REQUIRES(c, kernel_.size() == 2 && strides_.size() == 2 && dilations_.size() == 2,
                tf::errors::InvalidArgument("kernel_size, strides, dilations: 2 each"));
  }

 protected:
  // false (with the error set) when the inputs do not fit the geometry
  bool Read(tf::OpKernelContext* ctx, Geometry* s) {
    const tf::Tensor& inputs = ctx->input(0);
    const tf::Tensor& gradients = ctx->input(1);
    if (inputs.dims() != 4 || gradients.dims() != 4 ||
        inputs.dim_size(0) != gradients.dim_size(0)) {
      ctx->CtxFailure(tf::errors::InvalidArgument("inputs and output_gradients: [B, H, W, C]"));
      return false;
    }
    *s = Geometry{inputs.dim_size(0), inputs.dim_size(1), inputs.dim_size(2),
                  inputs.dim_size(3), gradients.dim_size(1), gradients.dim_size(2),
                  gradients.dim_size(3), kernel_[0], kernel_[1], strides_[0], strides_[1],
                  dilations_[0], dilations_[1]};
    if (s->rows > 0 && (s->rows - 1) * s->sh + (s->kh - 1) * s->dh >= s->height) {
      ctx->CtxFailure(tf::errors::InvalidArgument("the output rows reach past the inputs"));
      return false;
    }
    if (s->columns > 0 && (s->columns - 1) * s->sw + (s->kw - 1) * s->dw >= s->width) {
      ctx->CtxFailure(tf::errors::InvalidArgument("the output columns reach past the inputs"));
      return false;
    }
    return true;
  }

  std::vector<int32_t> kernel_, strides_, dilations_;
};

}  // namespace

REGISTER_OP("InsightPatchGradients")
    .Input("inputs: float")            // [B, H, W, in], padded
    .Input("output_gradients: float")  // [B, H', W', out]
    .Output("gradients: float")        // [B, count · in · out]
    .Attr("kernel_size: list(int)")    // kh, kw
    .Attr("strides: list(int)")        // sh, sw
    .Attr("dilations: list(int)")      // dh, dw
    .Attr("first: int >= 0")           // the first kernel offset, i · kw + j
    .Attr("count: int >= 1")           // offsets
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      int64_t count;
      TF_RETURN_IF_ERROR(c->GetAttr("count", &count));
      tf::shape_inference::DimensionHandle size;
      TF_RETURN_IF_ERROR(KernelSizeShape(c, count, &size));
      c->set_output(0, c->Matrix(c->Dim(c->input(0), 0), size));
      return tf::Status();
    });

class InsightPatchGradientsOp : public PatchOp {
 public:
  explicit InsightPatchGradientsOp(tf::OpKernelConstruction* c) : PatchOp(c) {
    OP_REQUIRES_OK(c, c->GetAttr("first", &first_));
    OP_REQUIRES_OK(c, c->GetAttr("count", &count_));
  }

  void Compute(tf::OpKernelContext* ctx) override {
    Geometry s;
    if (!Read(ctx, &s)) return;
    OP_REQUIRES(ctx, first_ + count_ <= s.kh * s.kw,
                tf::errors::InvalidArgument("offsets past the kernel's"));
    const int64_t size = count_ * s.in * s.out;
    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({s.batch, size}), &output));
    float* g = output->flat<float>().data();
    const float* x = ctx->input(0).flat<float>().data();
    const float* d = ctx->input(1).flat<float>().data();
    const bool patches = !Direct(s, count_);
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    tf::Shard(workers->NumThreads(), workers, s.batch, 2 * s.positions() * size,
              [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(patches ? s.positions() * count_ * s.in : 0);
      for (int64_t n = begin; n < end; ++n) {
        ExampleGradient(s, x + n * s.height * s.width * s.in, d + n * s.positions() * s.out,
                        first_, count_, scratch.data(), g + n * size);
      }
    });
  }

 private:
  int64_t first_, count_;
};

REGISTER_OP("InsightPatchSquareSums")
    .Input("inputs: float")            // [B, H, W, in], padded
    .Input("output_gradients: float")  // [B, H', W', out]
    .Output("square_sums: double")     // [kh · kw · in · out]
    .Attr("kernel_size: list(int)")    // kh, kw
    .Attr("strides: list(int)")        // sh, sw
    .Attr("dilations: list(int)")      // dh, dw
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      std::vector<int32_t> kernel;
      TF_RETURN_IF_ERROR(c->GetAttr("kernel_size", &kernel));
      tf::shape_inference::DimensionHandle size;
      TF_RETURN_IF_ERROR(KernelSizeShape(c, kernel.at(0) * kernel.at(1), &size));
      c->set_output(0, c->Vector(size));
      return tf::Status();
    });

class InsightPatchSquareSumsOp : public PatchOp {
 public:
  using PatchOp::PatchOp;

  void Compute(tf::OpKernelContext* ctx) override {
    Geometry s;
    if (!Read(ctx, &s)) return;
    const int64_t offsets = s.kh * s.kw, size = offsets * s.in * s.out;
    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({size}), &output));
    double* sums = output->flat<double>().data();
    std::fill(sums, sums + size, 0.0);
    const float* x = ctx->input(0).flat<float>().data();
    const float* d = ctx->input(1).flat<float>().data();
    const bool patches = !Direct(s, offsets);
    std::mutex mu;
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    tf::Shard(workers->NumThreads(), workers, s.batch, 2 * s.positions() * size,
              [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(patches ? s.positions() * offsets * s.in : 0), gradient(size);
      std::vector<double> local(size, 0.0);
      for (int64_t n = begin; n < end; ++n) {
        ExampleGradient(s, x + n * s.height * s.width * s.in, d + n * s.positions() * s.out,
                        0, offsets, scratch.data(), gradient.data());
#pragma omp simd
        for (int64_t k = 0; k < size; ++k) {
          const double g = gradient[k];
          local[k] += g * g;
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t k = 0; k < size; ++k) sums[k] += local[k];
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("InsightPatchGradients").Device(tf::DEVICE_CPU),
                        InsightPatchGradientsOp);
REGISTER_KERNEL_BUILDER(Name("InsightPatchSquareSums").Device(tf::DEVICE_CPU),
                        InsightPatchSquareSumsOp);

}  // namespace optinsight
