// Data-parallel sharding of one call: cut the batch (dim 0) into contiguous parts, compute
// each part on its own (on different servers), and combine the parts' results into the
// result of the whole batch.
//
// This is exact only when every layer treats batch rows independently: then the output and the
// input gradient of a part are the rows of the whole batch's. A batch_norm2d layer in training
// mode normalises with the statistics of the whole batch, so a network with one is refused
// (CheckRowsIndependent); in inference mode it is a per-row affine map and shards fine.
//
// The parameter gradients and the loss are sums over the rows, except where the objective is a
// mean, which the combination must undo. MSE's loss is a mean over the elements of the part,
// so part k (n_k of N rows) reports loss_k = sum_k / (n_k * M) and gradients scaled by
// 1 / (n_k * M); cross-entropy's is a mean over the part's c_k labels that are not
// ignore_index, of C = sum_k c_k in all. Weighting part k by w_k gives the whole batch's mean:
//
//   loss       = sum_k w_k * loss_k
//   d/dtheta   = sum_k w_k * d loss_k / d theta
//   d/dx rows  = w_k * d loss_k / d x_k              (concatenated)
//
//   w_k = n_k / N (mse), c_k / C (cross_entropy), 1 (sum, grad_output).
//
// A cross-entropy part whose labels are all ignored (c_k = 0) reports a NaN loss, as PyTorch
// does; its weight is 0 and its rows' input gradient 0, as in the whole batch. If every label
// is ignored (C = 0) the parts are added with weight 1, so the loss is NaN as the whole's is.
//
// The combined result equals the unsharded one up to float rounding (different summation
// order), not bit for bit.

#ifndef CLIENT_SHARDING_H_
#define CLIENT_SHARDING_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
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

// OK if cutting `network`'s batch into `shards` parts gives the result of the whole batch;
// otherwise (shards > 1 and a layer whose rows depend on each other, a batch_norm2d in
// training mode) InvalidArgument naming the layer. Checked before anything is sent.
absl::Status CheckRowsIndependent(const gradengine::NetworkSpec& network, int shards);

// The batch size of a request that can be cut along dim 0: a 4-dim input whose data match its
// shape and, for MSE and grad_output, an objective tensor with the same batch size and whole
// rows (for cross_entropy, labels so). 0 otherwise; such a request is sent whole, so that the
// server names what is wrong.
int64_t ShardableBatch(const gradengine::ForwardRequest& request);
int64_t ShardableBatch(const gradengine::GradientRequest& request);

// The request for `slice` of the batch: views into the rows of the original input and
// objective tensor (or labels), and everything else the same. Borrows from `request` as views do.
gradengine::ForwardRequest SliceRequest(const gradengine::ForwardRequest& request,
                                        BatchSlice slice);
gradengine::GradientRequest SliceRequest(const gradengine::GradientRequest& request,
                                         BatchSlice slice);

// The whole batch's result from the parts' results, part i computed for slices[i] of
// SplitBatch's slices of the batch. The timing is the slowest part's (the parts run at once).
// `objective` is the whole request's (cross-entropy's weights come from its labels).
// REQUIRES: parts and slices have the same size and the parts answer the slices of one request.
gradengine::ForwardResult CombineForwardResults(absl::Span<const BatchSlice> slices,
                                                std::vector<gradengine::ForwardResult> parts);
gradengine::GradientResult CombineGradientResults(const gradengine::Objective& objective,
                                                  absl::Span<const BatchSlice> slices,
                                                  std::vector<gradengine::GradientResult> parts);

}  // namespace gradclient

#endif  // CLIENT_SHARDING_H_
