// InsightHistograms: per-tensor histograms of the finite entries of N float tensors,
// the same counts and ranges as optinsight.dynamics._histograms: lo and hi are the
// smallest and largest finite entry (0 and 0 when there is none), and an entry v goes
// to bin clip(floor((v - lo) / width * bins), 0, bins - 1), width = hi - lo when
// hi > lo, else 1, computed in double as there. NaN and ±inf are not counted.
//
// Two passes over every entry (range, then counts), each in blocks spread over
// TensorFlow's CPU worker threads; each thread counts into kLanes counters per bin of
// its own, so that a run of equal entries (a dead layer) does not serialise its
// increments on one counter. Memory: O(threads × bins) besides the output.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace optinsight {

namespace tf = ::tensorflow;

REGISTER_OP("InsightHistograms")
    .Input("values: N * float")
    .Output("counts: int32")   // [N, bins]
    .Output("ranges: double")  // [N, 2]: lo, hi
    .Attr("N: int >= 1")
    .Attr("bins: int >= 1")
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      int n, bins;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      TF_RETURN_IF_ERROR(c->GetAttr("bins", &bins));
      c->set_output(0, c->Matrix(n, bins));
      c->set_output(1, c->Matrix(n, 2));
      return tf::Status();
    });

namespace {

constexpr int64_t kHistogramBlock = 1 << 16;  // entries per unit of parallel work
constexpr int kLanes = 4;                     // counters per bin and thread
constexpr int kChunk = 256;                   // entries per vectorised inner loop

}  // namespace

class InsightHistogramsOp : public tf::OpKernel {
 public:
  explicit InsightHistogramsOp(tf::OpKernelConstruction* c) : tf::OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("bins", &bins_));
  }

  void Compute(tf::OpKernelContext* ctx) override {
    tf::OpInputList values;
    OP_REQUIRES_OK(ctx, ctx->input_list("values", &values));
    const int n = values.size();
    struct Block { int tensor; int64_t first, size; };
    std::vector<Block> blocks;
    for (int t = 0; t < n; ++t) {
      const int64_t size = values[t].NumElements();
      for (int64_t first = 0; first < size; first += kHistogramBlock) {
        blocks.push_back({t, first, std::min(kHistogramBlock, size - first)});
      }
    }
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const int64_t cost = 4 * kHistogramBlock;  // per block, in TensorFlow's cost units

    // Pass 1: each block's smallest and largest finite entry (+FLT_MAX, -FLT_MAX: none).
    std::vector<float> block_lo(blocks.size(), FLT_MAX), block_hi(blocks.size(), -FLT_MAX);
    std::vector<char> block_any(blocks.size(), 0);
    tf::Shard(workers->NumThreads(), workers, blocks.size(), cost,
              [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float* v = values[blocks[b].tensor].flat<float>().data() + blocks[b].first;
        float lo = FLT_MAX, hi = -FLT_MAX;
        int32_t any = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : any)
        for (int64_t i = 0; i < blocks[b].size; ++i) {
          const bool finite = std::fabs(v[i]) <= FLT_MAX;  // false for NaN, inf
          lo = std::min(lo, finite ? v[i] : FLT_MAX);
          hi = std::max(hi, finite ? v[i] : -FLT_MAX);
          any += finite;
        }
        block_lo[b] = lo, block_hi[b] = hi, block_any[b] = any > 0;
      }
    });
    tf::Tensor* ranges_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, tf::TensorShape({n, 2}), &ranges_out));
    auto ranges = ranges_out->matrix<double>();
    std::vector<char> any(n, 0);
    std::vector<float> lo(n, FLT_MAX), hi(n, -FLT_MAX);
    for (size_t b = 0; b < blocks.size(); ++b) {
      const int t = blocks[b].tensor;
      if (!block_any[b]) continue;
      any[t] = 1, lo[t] = std::min(lo[t], block_lo[b]), hi[t] = std::max(hi[t], block_hi[b]);
    }
    for (int t = 0; t < n; ++t) {
      ranges(t, 0) = any[t] ? static_cast<double>(lo[t]) : 0.0;
      ranges(t, 1) = any[t] ? static_cast<double>(hi[t]) : 0.0;
    }

    // Pass 2: the counts. A shard of blocks counts into kLanes counters per bin of its
    // own and adds them to the output when it moves to another tensor or ends.
    const int bins = bins_;
    tf::Tensor* counts_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({n, bins}), &counts_out));
    auto counts = counts_out->matrix<int32_t>();
    counts.setZero();
    std::mutex mu;
    tf::Shard(workers->NumThreads(), workers, blocks.size(), cost,
              [&](int64_t begin, int64_t end) {
      std::vector<int32_t> local(kLanes * (bins + 1), 0);  // a spare bin each
      int current = -1;
      auto flush = [&]() {
        if (current < 0) return;
        std::lock_guard<std::mutex> lock(mu);
        for (int lane = 0; lane < kLanes; ++lane) {
          for (int k = 0; k < bins; ++k) counts(current, k) += local[lane * (bins + 1) + k];
        }
        std::fill(local.begin(), local.end(), 0);
      };
      for (int64_t b = begin; b < end; ++b) {
        const int t = blocks[b].tensor;
        if (!block_any[b]) continue;
        if (t != current) flush(), current = t;
        const float* v = values[t].flat<float>().data() + blocks[b].first;
        const double low = ranges(t, 0), high = ranges(t, 1);
        const double width = high > low ? high - low : 1.0, last = bins - 1, spare = bins;
        for (int64_t c = 0; c < blocks[b].size; c += kChunk) {
          const int m = static_cast<int>(std::min<int64_t>(kChunk, blocks[b].size - c));
          int32_t index[kChunk];
#pragma omp simd
          for (int i = 0; i < m; ++i) {  // a non-finite entry goes to the spare bin
            // position >= 0 (x >= lo), so truncation is the floor; std::floor would
            // keep the loop from vectorising
            const double x = v[c + i];
            const double position = (x - low) / width * bins;
            const double clipped = position < last ? position : last;
            index[i] = static_cast<int32_t>(std::fabs(x) <= FLT_MAX ? clipped : spare);
          }
          for (int i = 0; i < m; ++i) ++local[(i % kLanes) * (bins + 1) + index[i]];
        }
      }
      flush();
    });
  }

 private:
  int bins_;
};

REGISTER_KERNEL_BUILDER(Name("InsightHistograms").Device(tf::DEVICE_CPU), InsightHistogramsOp);

}  // namespace optinsight
