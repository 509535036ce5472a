// InsightPatchSquareSums: the elementwise sum over examples of the squared per-example
// kernel gradients of a convolution, Σ_n g_n² (double), where
//   g_n[i, j, c, o] = Σ_{a, b} x[n, a·sh + i·dh, b·sw + j·dw, c] · d[n, a, b, o],
// x the layer's inputs (padded), d the gradients of its outputs; flattened in the
// kernel's order [kh, kw, in, out]. The same sums as optinsight.per_example's
// `_square_sum` of a `Patches` part, where TensorFlow takes one batched matrix product
// per kernel offset, slow on CPU for the small matrices of one example.
//
// Examples are spread over TensorFlow's CPU worker threads. g_n of a small kernel
// (at most kDirect entries, out a multiple of kBlock) is summed over the positions
// kBlock outputs at a time in registers; a larger one is one Eigen product
// g_n = X_nᵀ d_n with X_n the example's patches [positions, kh·kw·in] (im2col). g_n is
// squared and added in double to the thread's sums, added to the output at the end.
// Memory per thread: positions · kh·kw·in (larger kernels only) + kh·kw·in·out
// floats, kh·kw·in·out doubles.

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

}  // namespace

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
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(c->input(0), 3), c->Dim(c->input(1), 3), &size));
      TF_RETURN_IF_ERROR(c->Multiply(size, kernel.at(0) * kernel.at(1), &size));
      c->set_output(0, c->Vector(size));
      return tf::Status();
    });

class InsightPatchSquareSumsOp : public tf::OpKernel {
 public:
  explicit InsightPatchSquareSumsOp(tf::OpKernelConstruction* c) : tf::OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("kernel_size", &kernel_));
    OP_REQUIRES_OK(c, c->GetAttr("strides", &strides_));
    OP_REQUIRES_OK(c, c->GetAttr("dilations", &dilations_));
    OP_REQUIRES(c, kernel_.size() == 2 && strides_.size() == 2 && dilations_.size() == 2,
                tf::errors::InvalidArgument("kernel_size, strides, dilations: 2 each"));
  }

  void Compute(tf::OpKernelContext* ctx) override {
    const tf::Tensor& inputs = ctx->input(0);
    const tf::Tensor& gradients = ctx->input(1);
    OP_REQUIRES(ctx, inputs.dims() == 4 && gradients.dims() == 4 &&
                         inputs.dim_size(0) == gradients.dim_size(0),
                tf::errors::InvalidArgument("inputs and output_gradients: [B, H, W, C]"));
    const int64_t batch = inputs.dim_size(0), height = inputs.dim_size(1),
                  width = inputs.dim_size(2), in = inputs.dim_size(3);
    const int64_t rows = gradients.dim_size(1), columns = gradients.dim_size(2),
                  out = gradients.dim_size(3);
    const int64_t kh = kernel_[0], kw = kernel_[1], sh = strides_[0], sw = strides_[1],
                  dh = dilations_[0], dw = dilations_[1];
    OP_REQUIRES(ctx, rows == 0 || (rows - 1) * sh + (kh - 1) * dh < height,
                tf::errors::InvalidArgument("the output rows reach past the inputs"));
    OP_REQUIRES(ctx, columns == 0 || (columns - 1) * sw + (kw - 1) * dw < width,
                tf::errors::InvalidArgument("the output columns reach past the inputs"));
    const int64_t positions = rows * columns, patch = kh * kw * in, size = patch * out;
    const bool direct = size <= kDirect && out % kBlock == 0;

    tf::Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({size}), &output));
    double* sums = output->flat<double>().data();
    std::fill(sums, sums + size, 0.0);
    const float* x = inputs.flat<float>().data();
    const float* d = gradients.flat<float>().data();

    using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    std::mutex mu;
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    tf::Shard(workers->NumThreads(), workers, batch, 2 * positions * size,
              [&](int64_t begin, int64_t end) {
      std::vector<float> patches(direct ? 0 : positions * patch), gradient(size);
      std::vector<double> local(size, 0.0);
      for (int64_t n = begin; n < end; ++n) {
        const float* image = x + n * height * width * in;
        const float* delta = d + n * positions * out;
        if (direct) {  // g_n a row and kBlock outputs at a time, in registers
          for (int64_t i = 0; i < kh; ++i) {
            for (int64_t j = 0; j < kw; ++j) {
              for (int64_t c = 0; c < in; ++c) {
                float* g = gradient.data() + ((i * kw + j) * in + c) * out;
                for (int64_t o0 = 0; o0 < out; o0 += kBlock) {
                  float sum[kChains][kBlock] = {};  // kChains sums, for the FMA latency
                  const float* row = delta + o0;
                  for (int64_t a = 0; a < rows; ++a) {
                    const float* pixel = image + ((a * sh + i * dh) * width + j * dw) * in + c;
                    int64_t b = 0;
                    for (; b + kChains <= columns; b += kChains, row += kChains * out) {
                      for (int q = 0; q < kChains; ++q) {
                        const float value = pixel[(b + q) * sw * in];
#pragma omp simd
                        for (int o = 0; o < kBlock; ++o) {
                          sum[q][o] = std::fma(value, row[q * out + o], sum[q][o]);
                        }
                      }
                    }
                    for (; b < columns; ++b, row += out) {
                      const float value = pixel[b * sw * in];
#pragma omp simd
                      for (int o = 0; o < kBlock; ++o) {
                        sum[0][o] = std::fma(value, row[o], sum[0][o]);
                      }
                    }
                  }
                  for (int o = 0; o < kBlock && o0 + o < out; ++o) {
                    g[o0 + o] = (sum[0][o] + sum[1][o]) + (sum[2][o] + sum[3][o]);
                  }
                }
              }
            }
          }
        } else {  // the patches X_n, and g_n = X_nᵀ d_n in one product
          float* row = patches.data();
          for (int64_t a = 0; a < rows; ++a) {
            for (int64_t b = 0; b < columns; ++b) {
              for (int64_t i = 0; i < kh; ++i) {
                for (int64_t j = 0; j < kw; ++j, row += in) {
                  const float* pixel = image + ((a * sh + i * dh) * width + b * sw + j * dw) * in;
                  std::copy_n(pixel, in, row);
                }
              }
            }
          }
          Eigen::Map<const Matrix> patches_n(patches.data(), positions, patch);
          Eigen::Map<const Matrix> gradients_n(delta, positions, out);
          Eigen::Map<Matrix> gradient_n(gradient.data(), patch, out);
          gradient_n.noalias() = patches_n.transpose() * gradients_n;
        }
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

 private:
  std::vector<int32_t> kernel_, strides_, dilations_;
};

REGISTER_KERNEL_BUILDER(Name("InsightPatchSquareSums").Device(tf::DEVICE_CPU),
                        InsightPatchSquareSumsOp);

}  // namespace optinsight
