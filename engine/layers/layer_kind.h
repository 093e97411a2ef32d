// One place per layer kind.
//
// Every alternative of gradengine::LayerOp has a specialisation of LayerKind<Spec> (its shape
// rule, parameters, plan key and cost, without oneDNN: engine/layers/<kind>.cc) and of
// Lowering<Spec> (its forward and backward oneDNN primitives: engine/layers/<kind>_lowering.cc,
// declared in engine/layers/lowering.h). All code that handles layers goes through these with
// VisitLayer(), an exhaustive std::visit: a kind missing a specialisation does not compile.
//
// Adding a layer kind, following Conv2dSpec through its files:
//   1. engine/include/gradengine/network.h: the spec struct (PyTorch's fields and defaults)
//      and its alternative in LayerOp.
//   2. engine/layers/<kind>.cc: LayerKind<Spec>: kName, InferShape (every field checked,
//      errors naming "layers[i].<kind>.<field>=value"), Parameters (names, shapes, whether
//      trainable), AppendKey (every field that changes the compiled plan), Flops.
//   3. engine/layers/<kind>_lowering.cc: Lowering<Spec>::Forward appends the forward
//      primitives and returns a LoweredLayer whose Backward appends the backward ones.
//   4. proto/grad/v1/gradient_service.proto + proto/wire.cc: the message and both conversions.
//   5. tests/reference/reference.cc: the double-precision op, proven by finite differences in
//      reference_test.cc, and a generator case in property_test.cc; a PyTorch fixture in
//      tests/torch/generate_fixtures.py; bad-input rows in tests/service/bad_input_test.cc.
// The compiler points at 2 and 3 (and at the wire's visitors) once 1 is done.

#ifndef ENGINE_LAYERS_LAYER_KIND_H_
#define ENGINE_LAYERS_LAYER_KIND_H_

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "gradengine/network.h"

namespace gradengine {

// What a shape rule sees of a layer's place in the network.
struct ShapeContext {
  // "layers[3]", the prefix of every message about the layer.
  std::string prefix;
  std::vector<int64_t> input_shape;
  // The shape of what an add adds (its `other`); empty for other kinds.
  std::vector<int64_t> other_shape;
};

// Specialised once per alternative of LayerOp; never defined for anything else. Each
// specialisation has:
//   static constexpr char kName[];  // "conv2d": the wire's field name and messages' word
//   // Checks the spec against its input and sets the output shape; InvalidArgument naming
//   // "<prefix>.<kName>.<field>=<value>" otherwise.
//   static absl::Status InferShape(const Spec&, const ShapeContext&, std::vector<int64_t>*);
//   // Appends the layer's parameters and buffers, in PyTorch's state_dict order.
//   static void Parameters(const std::string& layer, const Spec&, std::vector<ParameterInfo>*);
//   // Appends every field that changes the compiled plan.
//   static void AppendKey(const Spec&, std::string* key);
//   // Arithmetic of one forward pass, for choosing the thread count.
//   static double Flops(const Spec&, absl::Span<const int64_t> in, absl::Span<const int64_t> out);
//   // Whether a row of the output depends on other rows of the batch.
//   static bool MixesBatch(const Spec&);
template <typename Spec>
struct LayerKind;

// Calls f(LayerKind<Spec>{}, spec) for the alternative `op` holds.
template <typename F>
decltype(auto) VisitLayer(const LayerOp& op, F&& f) {
  return std::visit(
      [&](const auto& spec) -> decltype(auto) {
        using Spec = std::decay_t<decltype(spec)>;
        return f(LayerKind<Spec>{}, spec);
      },
      op);
}

// ---- Checks shared by the kinds' shape rules.

// Caps far above any real network, so that index arithmetic never overflows and a tiny
// request cannot make oneDNN spend minutes compiling kernels for absurd windows (padding,
// stride or dilation of 2^24 took 24-124 s to compile).
inline constexpr int64_t kMaxChannels = int64_t{1} << 24;
inline constexpr int64_t kMaxWindow = 4096;  // kernel size, stride, padding and dilation

// `field` (a full path) is >= 1 and <= limit.
absl::Status CheckPositive(const std::string& field, int64_t value, int64_t limit);
// `field` is >= 0 and <= limit.
absl::Status CheckNonNegative(const std::string& field, int64_t value, int64_t limit);
// The number of elements of `shape`, as a double, for the kinds' Flops.
double ElementCount(absl::Span<const int64_t> shape);
// The layer needs an NCHW input; refuses the [N, F] a linear layer gives.
absl::Status CheckFourDims(const ShapeContext& context, absl::string_view kind);

template <>
struct LayerKind<Conv2dSpec> {
  static constexpr char kName[] = "conv2d";
  static absl::Status InferShape(const Conv2dSpec& spec, const ShapeContext& context,
                                 std::vector<int64_t>* out);
  static void Parameters(const std::string& layer, const Conv2dSpec& spec,
                         std::vector<ParameterInfo>* out);
  static void AppendKey(const Conv2dSpec& spec, std::string* key);
  static double Flops(const Conv2dSpec& spec, absl::Span<const int64_t> in,
                      absl::Span<const int64_t> out);
  static bool MixesBatch(const Conv2dSpec&) { return false; }
};

template <>
struct LayerKind<ActivationSpec> {
  static constexpr char kName[] = "activation";
  static absl::Status InferShape(const ActivationSpec& spec, const ShapeContext& context,
                                 std::vector<int64_t>* out);
  static void Parameters(const std::string&, const ActivationSpec&, std::vector<ParameterInfo>*) {}
  static void AppendKey(const ActivationSpec& spec, std::string* key);
  static double Flops(const ActivationSpec& spec, absl::Span<const int64_t> in,
                      absl::Span<const int64_t> out);
  static bool MixesBatch(const ActivationSpec&) { return false; }
};

template <>
struct LayerKind<MaxPool2dSpec> {
  static constexpr char kName[] = "max_pool2d";
  static absl::Status InferShape(const MaxPool2dSpec& spec, const ShapeContext& context,
                                 std::vector<int64_t>* out);
  static void Parameters(const std::string&, const MaxPool2dSpec&, std::vector<ParameterInfo>*) {}
  static void AppendKey(const MaxPool2dSpec& spec, std::string* key);
  static double Flops(const MaxPool2dSpec& spec, absl::Span<const int64_t> in,
                      absl::Span<const int64_t> out);
  static bool MixesBatch(const MaxPool2dSpec&) { return false; }
};

template <>
struct LayerKind<AvgPool2dSpec> {
  static constexpr char kName[] = "avg_pool2d";
  static absl::Status InferShape(const AvgPool2dSpec& spec, const ShapeContext& context,
                                 std::vector<int64_t>* out);
  static void Parameters(const std::string&, const AvgPool2dSpec&, std::vector<ParameterInfo>*) {}
  static void AppendKey(const AvgPool2dSpec& spec, std::string* key);
  static double Flops(const AvgPool2dSpec& spec, absl::Span<const int64_t> in,
                      absl::Span<const int64_t> out);
  static bool MixesBatch(const AvgPool2dSpec&) { return false; }
};

template <>
struct LayerKind<BatchNorm2dSpec> {
  static constexpr char kName[] = "batch_norm2d";
  static absl::Status InferShape(const BatchNorm2dSpec& spec, const ShapeContext& context,
                                 std::vector<int64_t>* out);
  static void Parameters(const std::string& layer, const BatchNorm2dSpec& spec,
                         std::vector<ParameterInfo>* out);
  static void AppendKey(const BatchNorm2dSpec& spec, std::string* key);
  static double Flops(const BatchNorm2dSpec& spec, absl::Span<const int64_t> in,
                      absl::Span<const int64_t> out);
  static bool MixesBatch(const BatchNorm2dSpec& spec) { return spec.training; }
};

template <>
struct LayerKind<LinearSpec> {
  static constexpr char kName[] = "linear";
  static absl::Status InferShape(const LinearSpec& spec, const ShapeContext& context,
                                 std::vector<int64_t>* out);
  static void Parameters(const std::string& layer, const LinearSpec& spec,
                         std::vector<ParameterInfo>* out);
  static void AppendKey(const LinearSpec& spec, std::string* key);
  static double Flops(const LinearSpec& spec, absl::Span<const int64_t> in,
                      absl::Span<const int64_t> out);
  static bool MixesBatch(const LinearSpec&) { return false; }
};

template <>
struct LayerKind<AddSpec> {
  static constexpr char kName[] = "add";
  static absl::Status InferShape(const AddSpec& spec, const ShapeContext& context,
                                 std::vector<int64_t>* out);
  static void Parameters(const std::string&, const AddSpec&, std::vector<ParameterInfo>*) {}
  static void AppendKey(const AddSpec& spec, std::string* key);
  static double Flops(const AddSpec& spec, absl::Span<const int64_t> in,
                      absl::Span<const int64_t> out);
  static bool MixesBatch(const AddSpec&) { return false; }
};

}  // namespace gradengine

#endif  // ENGINE_LAYERS_LAYER_KIND_H_
