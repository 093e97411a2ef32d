// Data-parallel sharding of one call: cut the batch (dim 0) into contiguous parts, compute
// each part on its own (on different servers), and combine the parts' results into the
// result of the whole batch.
//
// Every layer treats batch rows independently, so the output and the input gradient of a
// part are the rows of the whole batch's. The parameter gradients and the loss are sums over
// the rows, with one exception the combination must undo: MSE's loss is a mean over the
// elements of the part, so part k (n_k of N rows) reports loss_k = sum_k / (n_k * M) and
// gradients scaled by 1 / (n_k * M). Weighting part k by n_k / N gives the whole batch's mean:
//
//   loss       = sum_k (n_k / N) * loss_k                  (sum: sum_k loss_k)
//   d/dtheta   = sum_k (n_k / N) * d loss_k / d theta      (sum, grad_output: weight 1)
//   d/dx rows  = (n_k / N) * d loss_k / d x_k              (concatenated)
//
// The combined result equals the unsharded one up to float rounding (different summation
// order), not bit for bit.

#ifndef CLIENT_SHARDING_H_
#define CLIENT_SHARDING_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradclient {

// Rows [begin, end) of the batch.
struct BatchSlice {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t rows() const { return end - begin; }
};

// min(shards, batch) slices covering [0, batch) in order, as equal as possible (the first
// batch % count slices have one row more). REQUIRES: shards >= 1, batch >= 1.
std::vector<BatchSlice> SplitBatch(int64_t batch, int shards);

// The batch size of a request that can be cut along dim 0: a 4-dim input whose data match its
// shape and, for MSE and grad_output, an objective tensor with the same batch size and whole
// rows. 0 otherwise; such a request is sent whole, so that the server names what is wrong.
int64_t ShardableBatch(const gradengine::ForwardRequest& request);
int64_t ShardableBatch(const gradengine::GradientRequest& request);

// The request for `slice` of the batch: views into the rows of the original input and
// objective tensor, and everything else the same. Borrows from `request` as views do.
gradengine::ForwardRequest SliceRequest(const gradengine::ForwardRequest& request,
                                        BatchSlice slice);
gradengine::GradientRequest SliceRequest(const gradengine::GradientRequest& request,
                                         BatchSlice slice);

// The whole batch's result from the parts' results, part i computed for slices[i] of
// SplitBatch's slices of the batch. The timing is the slowest part's (the parts run at once).
// REQUIRES: parts and slices have the same size and the parts answer the slices of one request.
gradengine::ForwardResult CombineForwardResults(absl::Span<const BatchSlice> slices,
                                                std::vector<gradengine::ForwardResult> parts);
gradengine::GradientResult CombineGradientResults(gradengine::ObjectiveKind objective,
                                                  absl::Span<const BatchSlice> slices,
                                                  std::vector<gradengine::GradientResult> parts);

}  // namespace gradclient

#endif  // CLIENT_SHARDING_H_
