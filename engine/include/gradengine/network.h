// The description of a computation: an ordered chain of named layers, the parameters they
// use, what the chain is trained against, and which gradients the caller wants.
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

struct LayerSpec {
  // Unique within the network; parameters are named "<name>.weight" and "<name>.bias".
  std::string name;
  std::variant<Conv2dSpec, ActivationSpec> op;
};

struct NetworkSpec {
  std::vector<LayerSpec> layers;
};

// Parameters by name ("conv1.weight", "conv1.bias"), borrowed for the duration of a call.
using ParameterViews = std::map<std::string, TensorView>;
// Parameter gradients by the parameter's name.
using ParameterTensors = std::map<std::string, Tensor>;

enum class ObjectiveKind {
  kMse,         // loss = mean((y - target)^2); `tensor` is the target, same shape as y
  kSum,         // loss = sum(y); no tensor
  kGradOutput,  // `tensor` is dL/dy supplied by the caller (a vector-Jacobian product)
};

// "mse", "sum", "grad_output".
const char* ObjectiveName(ObjectiveKind kind);

struct Objective {
  ObjectiveKind kind = ObjectiveKind::kMse;
  TensorView tensor;
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
  ComputeTiming timing;
};

// Shape facts derived by validation; index i describes layers[i].
struct ValidatedNetwork {
  std::vector<std::vector<int64_t>> output_shapes;
  // Every parameter the network uses with its expected shape, in layer order.
  std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes;
};

// Bounds on any network, whatever the server's other limits, so that a spec compiles in bounded
// time and memory (a compiled layer costs tens of KiB); GetInfo reports them. Over a count:
// ResourceExhausted; a longer name: InvalidArgument.
inline constexpr int64_t kMaxLayers = 1024;
// Parameter tensors a request may carry (two per conv2d layer at most).
inline constexpr int64_t kMaxParameters = 2 * kMaxLayers;
// Bytes of a layer or parameter name.
inline constexpr size_t kMaxNameBytes = 256;

// The checks of those bounds, naming `field` ("layers", "parameters", "layers[3].name").
absl::Status CheckCount(absl::string_view field, int64_t count, int64_t max_count);
absl::Status CheckName(absl::string_view field, absl::string_view name);

// Checks `network` against an NCHW `input_shape` and returns every layer's output shape.
// Errors are InvalidArgument naming the layer index and field, e.g.
// "layers[1].conv2d.groups=3 does not divide in_channels=8".
// Tensors with more than `max_elements` elements are ResourceExhausted.
absl::StatusOr<ValidatedNetwork> ValidateNetwork(const NetworkSpec& network,
                                                 absl::Span<const int64_t> input_shape,
                                                 int64_t max_elements);

// PyTorch's output size for one spatial dim, or a value < 1 when the kernel does not fit.
int64_t ConvOutputSize(int64_t input, int64_t kernel, int64_t stride, int64_t pad_begin,
                       int64_t pad_end, int64_t dilation);

// Number of elements of `shape`, or an error if a dim is negative or the product
// overflows int64. `what` names the tensor in the message.
absl::StatusOr<int64_t> CheckedNumElements(absl::Span<const int64_t> shape,
                                           const std::string& what);

}  // namespace gradengine

#endif  // GRADENGINE_NETWORK_H_
