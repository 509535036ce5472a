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

// Columns, as optinsight/metrics.py names them (tests/test_native.py checks these lists):
constexpr int kGlobalStats = 5;  // grad_sq, weight_sq, prev_weight_sq, wdiff_sq, nonfinite
constexpr int kBandStats = 8;  // grad1, grad2, retained, flipped, min, max, wdiff_sum, wdiff_max
constexpr int kWdiffMax = 7;   // the band column that adds up as a maximum
constexpr int64_t kBlock = 1 << 15;  // entries per unit of parallel work
constexpr int kChunk = 240;         // entries per vectorised inner loop

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

// Adds the statistics of two bands, a and b, over n <= kChunk entries to acc_a and
// acc_b (kBandStats columns each). prev, now: the gradient (or its average) at t-1
// and t; change: the weight change. kCounts: add the zero-band counts (grad1, grad2,
// retained); kRetained: add the statistics of retained entries (flipped, minimum,
// maximum, weight change). Returns the entries retained in either band. Bitwise
// operators instead of branches let the loop vectorise.
template <bool kCounts, bool kRetained>
uint32_t AddBandPair(const float* prev, const float* now, const float* change, int n,
                     float threshold_a, float threshold_b, double* acc_a, double* acc_b) {
  // Counts of band a and b: in the band at t-1 (grad1), at t (grad2), at both
  // (retained); retained and flipped, flipped at a minimum, at a maximum.
  uint32_t g1a = 0, g2a = 0, ra = 0, fa = 0, mina = 0, maxa = 0;
  uint32_t g1b = 0, g2b = 0, rb = 0, fb = 0, minb = 0, maxb = 0;
  float sum_a = 0.0f, sum_b = 0.0f, max_a = 0.0f, max_b = 0.0f;
#pragma omp simd reduction(+ : g1a, g2a, ra, fa, mina, maxa, g1b, g2b, rb, fb, minb, maxb) \
    reduction(+ : sum_a, sum_b) reduction(max : max_a, max_b)
  for (int i = 0; i < n; ++i) {
    // In a zero band: |x| <= threshold (false for NaN).
    const float abs_prev = std::fabs(prev[i]), abs_now = std::fabs(now[i]);
    const bool pa = abs_prev <= threshold_a, na = abs_now <= threshold_a;
    const bool pb = abs_prev <= threshold_b, nb = abs_now <= threshold_b;
    const bool reta = pa & na, retb = pb & nb;
    g1a += pa, g2a += na, ra += reta;
    g1b += pb, g2b += nb, rb += retb;
    if constexpr (kRetained) {
      const float diff = now[i] - prev[i];
      // A flip is a minimum when the weight moved along the gradient's change.
      const bool same = ((change[i] > 0) & (diff > 0)) | ((change[i] < 0) & (diff < 0));
      const bool across = ((change[i] > 0) & (diff < 0)) | ((change[i] < 0) & (diff > 0));
      const bool flipped = ((prev[i] < 0) & (now[i] > 0)) | ((prev[i] > 0) & (now[i] < 0));
      const float abs_change = finite(change[i]) ? std::fabs(change[i]) : 0.0f;
      const bool fla = reta & flipped, flb = retb & flipped;
      fa += fla, mina += fla & same, maxa += fla & across;
      fb += flb, minb += flb & same, maxb += flb & across;
      const float change_a = reta ? abs_change : 0.0f;
      const float change_b = retb ? abs_change : 0.0f;
      sum_a += change_a;
      sum_b += change_b;
      max_a = std::max(max_a, change_a);
      max_b = std::max(max_b, change_b);
    }
  }
  if constexpr (kCounts) {
    acc_a[0] += g1a, acc_a[1] += g2a, acc_a[2] += ra;
    acc_b[0] += g1b, acc_b[1] += g2b, acc_b[2] += rb;
  }
  if constexpr (kRetained) {
    acc_a[3] += fa, acc_a[4] += mina, acc_a[5] += maxa, acc_a[6] += sum_a;
    acc_b[3] += fb, acc_b[4] += minb, acc_b[5] += maxb, acc_b[6] += sum_b;
    acc_a[7] = std::max(acc_a[7], static_cast<double>(max_a));
    acc_b[7] = std::max(acc_b[7], static_cast<double>(max_b));
  }
  return ra + rb;
}

// Adds one family's band statistics over n <= kChunk entries to
// acc[k * kBandStats + column], two bands per pass. The statistics of retained
// entries are computed only for chunks that have any: in most chunks of a network
// without dead units there are none, and then a pass only counts. had_retained: whether
// the family's previous chunk had retained entries (then this one is assumed to have
// them too, saving a counting pass); updated.
void AddFamily(const float* prev, const float* now, const float* change, int n,
               const std::vector<float>& thresholds, bool& had_retained, double* acc) {
  double unused[kBandStats] = {};  // band b of a pass with an odd band out
  for (size_t k = 0; k < thresholds.size(); k += 2) {
    const bool pair = k + 1 < thresholds.size();
    const float threshold_b = thresholds[pair ? k + 1 : k];
    double* acc_a = acc + k * kBandStats;
    double* acc_b = pair ? acc + (k + 1) * kBandStats : unused;
    if (had_retained) {
      had_retained = AddBandPair<true, true>(prev, now, change, n, thresholds[k],
                                             threshold_b, acc_a, acc_b) > 0;
    } else if (AddBandPair<true, false>(prev, now, change, n, thresholds[k], threshold_b,
                                        acc_a, acc_b) > 0) {
      AddBandPair<false, true>(prev, now, change, n, thresholds[k], threshold_b, acc_a,
                               acc_b);
      had_retained = true;
    }
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
      for (int j = 0; j < k; ++j) {  // a second lock of one mutex would never return
        OP_REQUIRES(ctx, state[j].get() != state[k].get(),
                    errors::InvalidArgument("the three state variables must be distinct"));
      }
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
        bool raw_had_retained = true, avg_had_retained = true;  // see AddFamily
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
          AddFamily(pg + c, g + c, dw, n, thresholds_, raw_had_retained, acc + kGlobalStats);
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
          AddFamily(eg + c, new_ema, ema_change, n, thresholds_, avg_had_retained,
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
        const bool is_max = s >= kGlobalStats && (s - kGlobalStats) % kBandStats == kWdiffMax;
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
