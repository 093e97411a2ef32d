// The description of a computation: an ordered list of named layers (each reading the previous
// layer's output or a named earlier one), the parameters they use, what the network is trained
// against, and which gradients the caller wants.
//
// These are plain value types with PyTorch's meanings and layouts:
//   conv2d weight [out_channels, in_channels / groups, kernel_h, kernel_w], bias [out_channels],
//   dilation 1 = none, activations as in torch.nn.functional.
// ValidateNetwork() checks a spec against an input shape; the Engine calls it on every request.

#ifndef GRADENGINE_NETWORK_H_
#define GRADENGINE_NETWORK_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "gradengine/tensor.h"

namespace gradengine {

struct Conv2dSpec {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t kernel_h = 0;
  int64_t kernel_w = 0;
  int64_t stride_h = 1;
  int64_t stride_w = 1;
  // Zero padding added to each side of the input.
  int64_t pad_top = 0;
  int64_t pad_bottom = 0;
  int64_t pad_left = 0;
  int64_t pad_right = 0;
  // Spacing between kernel taps, as in PyTorch: 1 means a dense kernel.
  int64_t dilation_h = 1;
  int64_t dilation_w = 1;
  int64_t groups = 1;
  // Whether the layer has a bias parameter ("<name>.bias").
  bool bias = true;

  // Convenience for the common square case: kernel k×k, stride s, padding p on every side.
  static Conv2dSpec Square(int64_t in_channels, int64_t out_channels, int64_t kernel,
                           int64_t stride = 1, int64_t padding = 0, bool bias = true);
};

enum class ActivationKind {
  kRelu,
  kLeakyRelu,  // uses `alpha` as negative_slope (PyTorch default 0.01)
  kTanh,
  kSigmoid,
  kElu,       // uses `alpha` (PyTorch default 1.0)
  kGeluErf,   // F.gelu(x)  (approximate='none')
  kGeluTanh,  // F.gelu(x, approximate='tanh')
};

struct ActivationSpec {
  ActivationKind kind = ActivationKind::kRelu;
  // negative_slope for kLeakyRelu, alpha for kElu; ignored otherwise. Note the field's default
  // is 0; use the factories below for PyTorch's defaults.
  float alpha = 0.0f;

  // F.leaky_relu(x, negative_slope) and F.elu(x, alpha) with PyTorch's defaults.
  static ActivationSpec LeakyRelu(float negative_slope = 0.01f) {
    return {ActivationKind::kLeakyRelu, negative_slope};
  }
  static ActivationSpec Elu(float alpha = 1.0f) { return {ActivationKind::kElu, alpha}; }
};

// "relu", "leaky_relu", "tanh", "sigmoid", "elu", "gelu", "gelu_tanh".
const char* ActivationName(ActivationKind kind);

// F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode). Padding is implicit -inf
// on each side (PyTorch requires it to be at most half the kernel).
struct MaxPool2dSpec {
  int64_t kernel_h = 0;
  int64_t kernel_w = 0;
  // PyTorch's default stride is the kernel size; here it is always given (see Square).
  int64_t stride_h = 0;
  int64_t stride_w = 0;
  int64_t pad_h = 0;
  int64_t pad_w = 0;
  int64_t dilation_h = 1;
  int64_t dilation_w = 1;
  bool ceil_mode = false;

  // Kernel k×k, stride s (0: k, PyTorch's default), padding p.
  static MaxPool2dSpec Square(int64_t kernel, int64_t stride = 0, int64_t padding = 0);
};

// F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad).
struct AvgPool2dSpec {
  int64_t kernel_h = 0;
  int64_t kernel_w = 0;
  int64_t stride_h = 0;
  int64_t stride_w = 0;
  int64_t pad_h = 0;
  int64_t pad_w = 0;
  bool ceil_mode = false;
  // Whether the zero padding counts in each window's divisor (PyTorch's default: true).
  bool count_include_pad = true;

  static AvgPool2dSpec Square(int64_t kernel, int64_t stride = 0, int64_t padding = 0);
};

// torch.nn.BatchNorm2d(num_features, eps, momentum, affine), track_running_stats=True.
// Training mode (model.train()) normalises with the batch's mean and biased variance and
// updates the running statistics: running = (1 - momentum) * running + momentum * batch, with
// the unbiased variance. Inference mode (model.eval()) normalises with the running statistics.
// Parameters "<name>.weight" and "<name>.bias" ([num_features], if affine); the running
// statistics "<name>.running_mean" and "<name>.running_var" ([num_features]) are given like
// parameters, required in inference mode and optional in training mode (PyTorch's initial 0 and
// 1 when absent), and never differentiated.
struct BatchNorm2dSpec {
  int64_t num_features = 0;
  double eps = 1e-5;
  double momentum = 0.1;
  bool affine = true;
  bool training = true;
};

// F.linear(torch.flatten(x, 1), weight, bias): weight [out_features, in_features], bias
// [out_features]. The output is [N, out_features]; only linear layers, activations and adds
// may follow it.
struct LinearSpec {
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool bias = true;
};

// A residual connection: the layer's input plus the output of layer `other` (an earlier layer's
// name, or kNetworkInput), which must have the same shape.
struct AddSpec {
  std::string other;
};

// Every layer kind. Code that handles layers dispatches with std::visit over all of them, so a
// kind added here and not handled somewhere does not compile. See "Adding a layer kind" in
// engine/layers/layer_kind.h.
using LayerOp = std::variant<Conv2dSpec, ActivationSpec, MaxPool2dSpec, AvgPool2dSpec,
                             BatchNorm2dSpec, LinearSpec, AddSpec>;

// The name by which a layer's `input` or an add's `other` refers to the network's input; no
// layer may have it as its name.
inline constexpr char kNetworkInput[] = "input";

struct LayerSpec {
  LayerSpec() = default;
  LayerSpec(std::string name, LayerOp op, std::string input = "")
      : name(std::move(name)), op(std::move(op)), input(std::move(input)) {}

  // Unique within the network; its parameters are "<name>.weight", "<name>.bias", ... (see
  // LayerParameters).
  std::string name;
  LayerOp op;
  // What the layer reads: empty for the previous layer's output (the network's input for the
  // first layer), or the name of an earlier layer, or kNetworkInput. This is how a branch of a
  // residual block starts from the block's input.
  std::string input;
};

// The kind's name as on the wire and in messages: "conv2d", "activation", "max_pool2d",
// "avg_pool2d", "batch_norm2d", "linear", "add".
const char* LayerKindName(const LayerOp& op);

struct NetworkSpec {
  std::vector<LayerSpec> layers;
};

// One tensor a layer takes besides its input, named as in PyTorch's state_dict.
struct ParameterInfo {
  std::string name;  // "<layer>.weight"
  std::vector<int64_t> shape;
  // A learnable parameter (differentiated), or a buffer such as a running statistic (only read
  // and, in training mode, returned updated).
  bool trainable = true;
  // Whether a request must carry it; an optional one absent from a request takes `fill`.
  bool required = true;
  float fill = 0.0f;
  // A buffer every call updates and returns, by this name, in the result's running_stats.
  bool updated = false;
};

// Whether a row of the layer's output depends on other rows of the batch (batch norm in
// training mode): a call through such a layer cannot be split into parts of the batch.
bool MixesBatch(const LayerOp& op);

// The parameters and buffers of `layer`, in PyTorch's order. The one place parameter names
// and shapes come from: the engine, the wire, the clients and the tests all use it.
std::vector<ParameterInfo> LayerParameters(const LayerSpec& layer);

// Parameters by name ("conv1.weight", "conv1.bias"), borrowed for the duration of a call.
using ParameterViews = std::map<std::string, TensorView>;
// Parameter gradients by the parameter's name.
using ParameterTensors = std::map<std::string, Tensor>;

enum class ObjectiveKind {
  kMse,           // loss = mean((y - target)^2); `tensor` is the target, same shape as y
  kSum,           // loss = sum(y); no tensor
  kGradOutput,    // `tensor` is dL/dy supplied by the caller (a vector-Jacobian product)
  kCrossEntropy,  // F.cross_entropy(y, labels, ignore_index, label_smoothing), mean reduction
};

// "mse", "sum", "grad_output", "cross_entropy".
const char* ObjectiveName(ObjectiveKind kind);

// Class indices, borrowed for the duration of a call.
struct LabelsView {
  std::vector<int64_t> shape;
  const int64_t* data = nullptr;
  int64_t size = 0;
};

struct Objective {
  Objective() = default;
  Objective(ObjectiveKind kind, TensorView tensor = {}) : kind(kind), tensor(std::move(tensor)) {}

  ObjectiveKind kind = ObjectiveKind::kMse;
  TensorView tensor;
  // kCrossEntropy only. The network's output holds logits, [N, C] or [N, C, H, W]; `labels`
  // is [N] or [N, H, W] with values in [0, C) or equal to `ignore_index`. The loss is the mean
  // over the labels not ignored (NaN if all are, as in PyTorch).
  LabelsView labels;
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
};

// Which gradients to compute. Work nobody asked for is not done.
struct GradientSelection {
  bool input = true;
  // If true, every parameter's gradient; otherwise only those named in `parameters`.
  bool all_parameters = true;
  std::vector<std::string> parameters;

  // Whether the gradient of parameter `name` is asked for.
  bool WantsParameter(const std::string& name) const;
};

// Called between layers; a non-OK status (e.g. DeadlineExceeded, Cancelled) stops the call
// and is returned as its result. Must be safe to call from the calling thread.
using ContinueCheck = std::function<absl::Status()>;

// Caller-provided memory for one result: `size` floats at `data`, kept alive by `owner` (may
// be null if the caller otherwise keeps the memory alive until it is done with the result).
struct ResultMemory {
  float* data = nullptr;
  int64_t size = 0;
  std::shared_ptr<const void> owner;
};

// Where a call's results go, when the caller wants them in memory it provides (a response
// buffer, a shared memory region) instead of buffers the engine allocates. Each given
// ResultMemory must hold exactly the result's element count; the engine writes all of it and
// the result Tensor refers to it. A result without an entry gets a fresh, uninitialised
// allocation that the engine fills.
struct ResultPlacement {
  std::optional<ResultMemory> output;
  std::optional<ResultMemory> input_grad;               // ComputeGradients only
  std::map<std::string, ResultMemory> parameter_grads;  // ComputeGradients only; by name
};

struct ForwardRequest {
  NetworkSpec network;
  ParameterViews parameters;
  TensorView input;
  ContinueCheck should_continue;  // optional
  ResultPlacement placement;      // optional
};

// Where a call's time went, measured by the engine with a monotonic clock.
struct ComputeTiming {
  // From the call's start (validation, plan lookup, result allocation included) to the end of
  // the forward pass, and for gradients the loss.
  int64_t forward_ns = 0;
  // The backward pass; 0 for Forward.
  int64_t backward_ns = 0;
};

struct ForwardResult {
  Tensor output;
  // For every batch_norm2d layer in training mode: "<name>.running_mean" and
  // "<name>.running_var" after this call's update.
  ParameterTensors running_stats;
  ComputeTiming timing;
};

struct GradientRequest {
  NetworkSpec network;
  ParameterViews parameters;
  TensorView input;
  Objective objective;
  GradientSelection gradients;
  ContinueCheck should_continue;  // optional
  ResultPlacement placement;      // optional
};

struct GradientResult {
  Tensor output;
  // Absent for kGradOutput, where the caller owns the loss.
  std::optional<double> loss;
  // Present iff requested.
  std::optional<Tensor> input_grad;
  // One entry per requested parameter, same shape as the parameter.
  ParameterTensors parameter_grads;
  // As ForwardResult::running_stats.
  ParameterTensors running_stats;
  ComputeTiming timing;
};

// Shape facts derived by validation; index i describes layers[i].
struct ValidatedNetwork {
  std::vector<std::vector<int64_t>> output_shapes;
  // What each layer reads: the index of the layer whose output it is, or -1 for the network's
  // input. For an add, `add_sources[i]` is the index its `other` names (-1: the input).
  std::vector<int> input_sources;
  std::vector<int> add_sources;
  // Every parameter and buffer the network uses, in layer order.
  std::vector<ParameterInfo> parameters;
  // Whether any layer's output depends on other rows of the batch (batch norm in training
  // mode): such a call cannot be split by rows.
  bool mixes_batch = false;
};

// Bounds on any network, whatever the server's other limits, so that a spec compiles in bounded
// time and memory (a compiled layer costs tens of KiB); GetInfo reports them. Over a count:
// ResourceExhausted; a longer name: InvalidArgument.
inline constexpr int64_t kMaxLayers = 1024;
// Parameter tensors a request may carry (four per batch_norm2d layer at most).
inline constexpr int64_t kMaxParameters = 4 * kMaxLayers;
// Bytes of a layer or parameter name.
inline constexpr size_t kMaxNameBytes = 256;

// The checks of those bounds, naming `field` ("layers", "parameters", "layers[3].name").
absl::Status CheckCount(absl::string_view field, int64_t count, int64_t max_count);
absl::Status CheckName(absl::string_view field, absl::string_view name);

// Checks `network` against an NCHW `input_shape` and returns every layer's output shape.
// Each layer's output is NCHW, or [N, F] from a linear layer on.
// Errors are InvalidArgument naming the layer index and field, e.g.
// "layers[1].conv2d.groups=3 does not divide in_channels=8".
// Tensors with more than `max_elements` elements are ResourceExhausted.
absl::StatusOr<ValidatedNetwork> ValidateNetwork(const NetworkSpec& network,
                                                 absl::Span<const int64_t> input_shape,
                                                 int64_t max_elements);

// PyTorch's output size for one spatial dim, or a value < 1 when the kernel does not fit.
int64_t ConvOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad_begin,
                       int64_t pad_end, int64_t dilation);

// PyTorch's output size of one spatial dim of a pooling window (pooling_output_shape): with
// ceil_mode the last window may run past the input, but must start inside it or its left
// padding. A value < 1 when the window does not fit.
int64_t PoolOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                       bool ceil_mode);

// Number of elements of `shape`, or an error if a dim is negative or the product
// overflows int64. `what` names the tensor in the message.
absl::StatusOr<int64_t> CheckedNumElements(absl::Span<const int64_t> shape,
                                           const std::string& what);

}  // namespace gradengine

#endif  // GRADENGINE_NETWORK_H_
