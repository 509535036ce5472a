// InsightStepStatistics: one pass over a step's gradients and weights that yields the
// statistics matrix of optinsight.dynamics._step_statistics (same columns, same
// definitions) and updates the tracker's state variables in place: the previous
// gradient becomes this step's, and the moving averages advance. In place, because a
// fresh O(parameters) output per step costs more than the arithmetic (new pages).
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
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace optinsight {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpInputList;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Var;
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
    .Input("prev_grad: resource")          // float [P], set to the flat gradient
    .Input("ema_grad: resource")           // float [P] or [0], advanced
    .Input("ema_weight_offset: resource")  // float [P] or [0], advanced
    .Input("has_prev: bool")
    .Output("stats: double")
    .SetIsStateful()
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
    const int n_vars = grads.size();
    const bool has_prev = ctx->input(3 * n_vars + 3).scalar<bool>()();
    const bool ema = !ema_.empty();
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

    // The state variables, locked (always in this order) for the whole update.
    ::tensorflow::core::RefCountPtr<Var> state[3];
    std::vector<::tensorflow::mutex_lock> locks;
    float* data[3];
    for (int k = 0; k < 3; ++k) {
      OP_REQUIRES_OK(ctx, ::tensorflow::LookupResource(
                              ctx, ::tensorflow::HandleFromInput(ctx, 3 * n_vars + k),
                              &state[k]));
      locks.emplace_back(*state[k]->mu());
      Tensor* tensor = state[k]->tensor();
      const int64_t size = (k == 0 || ema) ? total : 0;
      OP_REQUIRES(ctx, tensor->dtype() == ::tensorflow::DT_FLOAT &&
                           tensor->NumElements() == size,
                  errors::InvalidArgument("state variable ", k, " must be float32 with ",
                                          size, " entries"));
      if (state[k]->copy_on_read_mode.load() || !tensor->RefCountIsOne()) {
        // A read of the old value is still alive: update a copy (copy-on-write).
        Tensor copy;
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DT_FLOAT, tensor->shape(),
                                               &copy));
        std::copy_n(tensor->flat<float>().data(), size, copy.flat<float>().data());
        *tensor = copy;
      }
      data[k] = tensor->flat<float>().data();
    }

    Tensor* stats = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n_vars, n_stats}), &stats));

    std::vector<double> partial(blocks.size() * n_stats, 0.0);
    auto run = [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Block& block = blocks[b];
        const float* g = grads[block.var].flat<float>().data() + block.first;
        const float* w0 = before[block.var].flat<float>().data() + block.first;
        const float* w1 = after[block.var].flat<float>().data() + block.first;
        float* pg = data[0] + block.offset;
        float* eg = ema ? data[1] + block.offset : nullptr;
        float* eo = ema ? data[2] + block.offset : nullptr;
        double* acc = partial.data() + b * n_stats;
        for (int64_t c = 0; c < block.size; c += kChunk) {
          const int n = static_cast<int>(std::min<int64_t>(kChunk, block.size - c));
          float dw[kChunk], new_ema[kChunk], ema_change[kChunk];
          float grad_sq = 0, weight_sq = 0, prev_weight_sq = 0, wdiff_sq = 0;
          int32_t nonfinite = 0;
#pragma omp simd reduction(+ : grad_sq, weight_sq, prev_weight_sq, wdiff_sq, nonfinite)
          for (int i = 0; i < n; ++i) {
            const float gi = g[c + i], before_i = w0[c + i], after_i = w1[c + i];
            dw[i] = after_i - before_i;
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
          std::copy_n(g + c, n, pg + c);
          if (!ema) continue;
          // Moving averages (see _step_statistics): a non-finite gradient entry keeps
          // the average; the weight average is kept as its offset from the weights.
          const float d = ema_[0], complement = ema_[1];
#pragma omp simd
          for (int i = 0; i < n; ++i) {
            const float gi = g[c + i];
            const float kept = has_prev ? eg[c + i] : 0.0f;
            const float g_finite = finite(gi) ? gi : kept;
            new_ema[i] = has_prev ? d * eg[c + i] + complement * g_finite : g_finite;
            const float old_offset = has_prev ? eo[c + i] : 0.0f;
            ema_change[i] = complement * (dw[i] - old_offset);
            eo[c + i] = d * (old_offset - dw[i]);
          }
          AddFamily(eg + c, new_ema, ema_change, n, thresholds_,
                    acc + kGlobalStats + n_bands);
          std::copy_n(new_ema, n, eg + c);
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
