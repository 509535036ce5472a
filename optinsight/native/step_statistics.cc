// InsightStepStatistics: one pass over a step's gradients and weights that yields the
// statistics matrix of optinsight.dynamics._step_statistics (same columns, same
// definitions) and the next state (flat gradient, moving averages).
//
// The XLA version makes one loop per reduction over all parameters; this kernel reads
// every parameter once, in blocks spread over TensorFlow's CPU worker threads.
// Within a block, entries are handled in chunks of kChunk so that each inner loop
// is a simple, vectorisable reduction.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace optinsight {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpInputList;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;
namespace shape_inference = ::tensorflow::shape_inference;

constexpr int kGlobalStats = 5;  // grad_sq, weight_sq, prev_weight_sq, wdiff_sq, nonfinite
constexpr int kBandStats = 8;    // grad1, grad2, retained, flipped, min, max, wdiff sum, max
constexpr int64_t kBlock = 1 << 15;  // entries per unit of parallel work
constexpr int kChunk = 240;         // entries per vectorised inner loop (< 256)

REGISTER_OP("InsightStepStatistics")
    .Input("grads: N * float")
    .Input("weights_before: N * float")
    .Input("weights: N * float")
    .Input("prev_grad: float")
    .Input("ema_grad: float")
    .Input("ema_weight_offset: float")
    .Input("has_prev: bool")
    .Output("stats: double")
    .Output("grad: float")
    .Output("new_ema_grad: float")
    .Output("new_ema_weight_offset: float")
    .Attr("N: int >= 1")
    .Attr("thresholds: list(float)")
    .Attr("ema: list(float)")  // [] or [d, 1 - d] (1 - d rounded from double, as in TF)
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      int n;
      std::vector<float> thresholds, ema;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      TF_RETURN_IF_ERROR(c->GetAttr("thresholds", &thresholds));
      TF_RETURN_IF_ERROR(c->GetAttr("ema", &ema));
      const int families = ema.empty() ? 1 : 2;
      c->set_output(0, c->Matrix(n, kGlobalStats + families * thresholds.size() * kBandStats));
      c->set_output(1, c->input(3 * n));
      c->set_output(2, c->input(3 * n + 1));
      c->set_output(3, c->input(3 * n + 2));
      return Status();
    });

namespace {

inline bool finite(float x) { return std::fabs(x) <= FLT_MAX; }  // false for NaN, inf

// Adds one family's band statistics over n <= kChunk entries to
// acc[k * kBandStats + column]. prev, now: the gradient (or its average) at t-1 and
// t; change: the weight change. Counts that are added together are packed into one
// integer, a field per count (8 bits suffice for kChunk entries), so that each band
// costs a few vector operations per entry.
void AddFamily(const float* prev, const float* now, const float* change, int n,
               const std::vector<float>& thresholds, double* acc) {
  uint32_t kept_counts[kChunk];  // fields: retained (1), flipped, minimum, maximum
  float abs_change[kChunk];
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float diff = now[i] - prev[i];
    // Bitwise operators: no branches, so the loop vectorises.
    const uint32_t up = (change[i] > 0) & (diff > 0), down = (change[i] < 0) & (diff < 0);
    const uint32_t across = ((change[i] > 0) & (diff < 0)) | ((change[i] < 0) & (diff > 0));
    const uint32_t flipped = ((prev[i] < 0) & (now[i] > 0)) | ((prev[i] > 0) & (now[i] < 0));
    // A flip is a minimum when the weight moved along the gradient's change.
    kept_counts[i] = 1u | flipped << 8 | (flipped & (up | down)) << 16 |
                     (flipped & across) << 24;
    abs_change[i] = finite(change[i]) ? std::fabs(change[i]) : 0.0f;
  }
  for (size_t k = 0; k < thresholds.size(); ++k) {
    const float threshold = thresholds[k];
    uint32_t zeros = 0, kept = 0;  // zeros: grad1 | grad2 << 16
    float change_sum = 0.0f, change_max = 0.0f;
#pragma omp simd reduction(+ : zeros, kept, change_sum) reduction(max : change_max)
    for (int i = 0; i < n; ++i) {
      // In the zero band: |x| <= threshold (false for NaN).
      const uint32_t in_prev = std::fabs(prev[i]) <= threshold;
      const uint32_t in_now = std::fabs(now[i]) <= threshold;
      zeros += in_prev | in_now << 16;
      const bool retained = in_prev & in_now;
      kept += retained ? kept_counts[i] : 0u;
      const float c = retained ? abs_change[i] : 0.0f;
      change_sum += c;
      change_max = std::max(change_max, c);
    }
    double* a = acc + k * kBandStats;
    a[0] += zeros & 0xffffu;
    a[1] += zeros >> 16;
    for (int field = 0; field < 4; ++field) a[2 + field] += (kept >> (8 * field)) & 0xffu;
    a[6] += change_sum;
    a[7] = std::max(a[7], static_cast<double>(change_max));
  }
}

}  // namespace

class InsightStepStatisticsOp : public OpKernel {
 public:
  explicit InsightStepStatisticsOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("thresholds", &thresholds_));
    OP_REQUIRES_OK(c, c->GetAttr("ema", &ema_));
    OP_REQUIRES(c, ema_.empty() || ema_.size() == 2,
                errors::InvalidArgument("ema must be [] or [decay, 1 - decay]"));
  }

  void Compute(OpKernelContext* ctx) override {
    OpInputList grads, before, after;
    OP_REQUIRES_OK(ctx, ctx->input_list("grads", &grads));
    OP_REQUIRES_OK(ctx, ctx->input_list("weights_before", &before));
    OP_REQUIRES_OK(ctx, ctx->input_list("weights", &after));
    const Tensor& prev_grad = ctx->input(3 * grads.size());
    const Tensor& ema_grad = ctx->input(3 * grads.size() + 1);
    const Tensor& ema_offset = ctx->input(3 * grads.size() + 2);
    const bool has_prev = ctx->input(3 * grads.size() + 3).scalar<bool>()();
    const bool ema = !ema_.empty();
    const int n_vars = grads.size();
    const int n_bands = thresholds_.size() * kBandStats;
    const int n_stats = kGlobalStats + (ema ? 2 : 1) * n_bands;

    // Blocks: (variable, first entry, entries, offset in the flat vectors).
    struct Block { int var; int64_t first, size, offset; };
    std::vector<Block> blocks;
    int64_t total = 0;
    for (int v = 0; v < n_vars; ++v) {
      const int64_t size = grads[v].NumElements();
      OP_REQUIRES(ctx, before[v].NumElements() == size && after[v].NumElements() == size,
                  errors::InvalidArgument("variable ", v, ": gradient and weights differ "
                                          "in size"));
      for (int64_t first = 0; first < size; first += kBlock) {
        blocks.push_back({v, first, std::min(kBlock, size - first), total + first});
      }
      total += size;
    }
    OP_REQUIRES(ctx, prev_grad.NumElements() == total,
                errors::InvalidArgument("prev_grad has ", prev_grad.NumElements(),
                                        " entries, the variables ", total));
    const int64_t ema_size = ema ? total : 0;
    OP_REQUIRES(ctx, ema_grad.NumElements() == ema_size &&
                         ema_offset.NumElements() == ema_size,
                errors::InvalidArgument("moving-average state must have ", ema_size,
                                        " entries"));

    Tensor* stats = nullptr;
    Tensor *grad_out = nullptr, *ema_grad_out = nullptr, *ema_offset_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n_vars, n_stats}), &stats));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, prev_grad.shape(), &grad_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ema_grad.shape(), &ema_grad_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, ema_offset.shape(), &ema_offset_out));

    std::vector<double> partial(blocks.size() * n_stats, 0.0);
    auto run = [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Block& block = blocks[b];
        const float* g = grads[block.var].flat<float>().data() + block.first;
        const float* w0 = before[block.var].flat<float>().data() + block.first;
        const float* w1 = after[block.var].flat<float>().data() + block.first;
        const float* pg = prev_grad.flat<float>().data() + block.offset;
        float* g_out = grad_out->flat<float>().data() + block.offset;
        const float* eg = ema ? ema_grad.flat<float>().data() + block.offset : nullptr;
        const float* eo = ema ? ema_offset.flat<float>().data() + block.offset : nullptr;
        float* eg_out = ema ? ema_grad_out->flat<float>().data() + block.offset : nullptr;
        float* eo_out = ema ? ema_offset_out->flat<float>().data() + block.offset : nullptr;
        double* acc = partial.data() + b * n_stats;
        for (int64_t c = 0; c < block.size; c += kChunk) {
          const int n = static_cast<int>(std::min<int64_t>(kChunk, block.size - c));
          float dw[kChunk], ema_change[kChunk];
          float grad_sq = 0, weight_sq = 0, prev_weight_sq = 0, wdiff_sq = 0;
          int32_t nonfinite = 0;
#pragma omp simd reduction(+ : grad_sq, weight_sq, prev_weight_sq, wdiff_sq, nonfinite)
          for (int i = 0; i < n; ++i) {
            const float gi = g[c + i], before_i = w0[c + i], after_i = w1[c + i];
            dw[i] = after_i - before_i;
            g_out[c + i] = gi;
            nonfinite += !finite(gi);
            grad_sq += finite(gi) ? gi * gi : 0.0f;
            weight_sq += finite(after_i) ? after_i * after_i : 0.0f;
            prev_weight_sq += finite(before_i) ? before_i * before_i : 0.0f;
            wdiff_sq += finite(dw[i]) ? dw[i] * dw[i] : 0.0f;
          }
          acc[0] += grad_sq;
          acc[1] += weight_sq;
          acc[2] += prev_weight_sq;
          acc[3] += wdiff_sq;
          acc[4] += nonfinite;
          AddFamily(pg + c, g + c, dw, n, thresholds_, acc + kGlobalStats);
          if (!ema) continue;
          // Moving averages (see _step_statistics): a non-finite gradient entry keeps
          // the average; the weight average is kept as its offset from the weights.
          const float d = ema_[0], complement = ema_[1];
#pragma omp simd
          for (int i = 0; i < n; ++i) {
            const float gi = g[c + i];
            const float kept = has_prev ? eg[c + i] : 0.0f;
            const float g_finite = finite(gi) ? gi : kept;
            eg_out[c + i] = has_prev ? d * eg[c + i] + complement * g_finite : g_finite;
            const float old_offset = has_prev ? eo[c + i] : 0.0f;
            ema_change[i] = complement * (dw[i] - old_offset);
            eo_out[c + i] = d * (old_offset - dw[i]);
          }
          AddFamily(eg + c, eg_out + c, ema_change, n, thresholds_,
                    acc + kGlobalStats + n_bands);
        }
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    ::tensorflow::Shard(workers->NumThreads(), workers, blocks.size(), 40 * kBlock, run);

    auto out = stats->matrix<double>();
    out.setZero();
    for (size_t b = 0; b < blocks.size(); ++b) {
      const double* acc = partial.data() + b * n_stats;
      for (int s = 0; s < n_stats; ++s) {
        const bool is_max = s >= kGlobalStats && (s - kGlobalStats) % kBandStats == 7;
        double& cell = out(blocks[b].var, s);
        cell = is_max ? std::max(cell, acc[s]) : cell + acc[s];
      }
    }
  }

 private:
  std::vector<float> thresholds_;
  std::vector<float> ema_;
};

REGISTER_KERNEL_BUILDER(Name("InsightStepStatistics").Device(DEVICE_CPU),
                        InsightStepStatisticsOp);

}  // namespace optinsight
