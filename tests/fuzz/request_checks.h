// What the two request fuzz targets share: how an input picks the RPC and the element limit,
// and the properties a decoded and a validated request must have.
//
// An input starts with a selector byte, followed by a serialized request (request_framing_fuzzer
// adds the request's length and a plan, see there). The selector's bit 0 picks the RPC
// (0 Forward, 1 ComputeGradients); bits 1-7 hold n, and the element limit is the server's
// default 2^30 for n = 0, 2^n for n < 63 and INT64_MAX above.

#ifndef TESTS_FUZZ_REQUEST_CHECKS_H_
#define TESTS_FUZZ_REQUEST_CHECKS_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <variant>
#include <vector>

#include "absl/strings/str_join.h"
#include "grad/v1/gradient_service.pb.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"
#include "proto/wire.h"
#include "tests/fuzz/fuzz_check.h"

namespace gradfuzz {

struct RequestInput {
  bool gradients = false;
  int64_t max_elements = 0;
  const uint8_t* message = nullptr;
  int message_size = 0;
};

// False for an input too short to hold the selector.
inline bool SplitRequestInput(const uint8_t* data, size_t size, RequestInput* out) {
  if (size < 1 || size - 1 > static_cast<size_t>(std::numeric_limits<int>::max())) return false;
  out->gradients = (data[0] & 1) != 0;
  const int n = data[0] >> 1;
  out->max_elements = n == 0   ? int64_t{1} << 30
                      : n < 63 ? int64_t{1} << n
                               : std::numeric_limits<int64_t>::max();
  out->message = data + 1;
  out->message_size = static_cast<int>(size - 1);
  return true;
}

// product(shape), or -1 if a dim is negative or the product does not fit in int64.
inline int64_t ElementCount(const std::vector<int64_t>& shape) {
  __int128 count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return -1;
    count *= dim;
    if (count > std::numeric_limits<int64_t>::max()) return -1;
  }
  return static_cast<int64_t>(count);
}

inline std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Every element of `view` is read (so that ASan sees a view reaching past its memory), and the
// view agrees with its wire tensor: same shape, and, for a tensor sent as bytes, the same bytes.
// A tensor in shared memory is checked against its reference by the caller.
inline void CheckView(const gradengine::TensorView& view, const grad::v1::Tensor& wire,
                      const std::string& field) {
  const std::vector<int64_t> wire_shape(wire.shape().begin(), wire.shape().end());
  FUZZ_CHECK(view.shape == wire_shape, field, ": decoded shape ", ShapeText(view.shape),
             ", wire shape ", ShapeText(wire_shape));
  FUZZ_CHECK(view.size == ElementCount(view.shape), field, ": ", view.size, " elements for shape ",
             ShapeText(view.shape));
  FUZZ_CHECK(view.size == 0 || view.data != nullptr, field, ": no data for ", view.size,
             " elements");
  uint32_t bits = 0;
  for (int64_t i = 0; i < view.size; ++i) {
    uint32_t element;
    std::memcpy(&element, &view.data[i], sizeof(element));
    bits ^= element;
  }
  if (wire.has_shared_memory()) {
    FUZZ_CHECK(view.size * static_cast<int64_t>(sizeof(float)) == wire.shared_memory().byte_size(),
               field, ": ", view.size,
               " elements decoded from shared_memory.byte_size=", wire.shared_memory().byte_size());
    return;
  }
  FUZZ_CHECK(
      static_cast<int64_t>(wire.data().size()) == view.size * static_cast<int64_t>(sizeof(float)),
      field, ": ", view.size, " elements decoded from ", wire.data().size(), " bytes");
  FUZZ_CHECK(view.size == 0 || std::memcmp(view.data, wire.data().data(), wire.data().size()) == 0,
             field, ": the decoded values differ from the wire bytes (xor of the bits ", bits, ")");
}

// The decoded network is the wire's, and decoding is a fixed point: encoding the spec and
// decoding that again gives the same spec.
inline void CheckNetwork(const gradengine::NetworkSpec& network, const grad::v1::Network& wire) {
  FUZZ_CHECK(network.layers.size() == static_cast<size_t>(wire.layers_size()),
             network.layers.size(), " layers decoded from ", wire.layers_size());
  for (size_t i = 0; i < network.layers.size(); ++i) {
    const gradengine::LayerSpec& layer = network.layers[i];
    const grad::v1::Layer& wire_layer = wire.layers(static_cast<int>(i));
    FUZZ_CHECK(layer.name == wire_layer.name(), "layers[", i, "].name");
    FUZZ_CHECK(layer.input == wire_layer.input(), "layers[", i, "].input");
    // The wire's oneof fields are named as the engine's kinds.
    const google::protobuf::FieldDescriptor* op =
        wire_layer.GetReflection()->GetOneofFieldDescriptor(
            wire_layer, wire_layer.GetDescriptor()->FindOneofByName("op"));
    FUZZ_CHECK(op != nullptr && op->name() == gradengine::LayerKindName(layer.op), "layers[", i,
               "] decoded as ", gradengine::LayerKindName(layer.op));
  }
  grad::v1::Network encoded;
  gradwire::EncodeNetwork(network, &encoded);
  absl::StatusOr<gradengine::NetworkSpec> again = gradwire::DecodeNetwork(encoded);
  FUZZ_CHECK(again.ok(), "an encoded spec does not decode: ", again.status().ToString());
  grad::v1::Network encoded_again;
  gradwire::EncodeNetwork(*again, &encoded_again);
  FUZZ_CHECK(encoded.SerializeAsString() == encoded_again.SerializeAsString(),
             "encode(decode(encode(spec))) differs from encode(spec)");
}

// As CheckView, for class indices.
inline void CheckLabels(const gradengine::LabelsView& labels, const grad::v1::Tensor& wire,
                        const std::string& field) {
  const std::vector<int64_t> wire_shape(wire.shape().begin(), wire.shape().end());
  FUZZ_CHECK(labels.shape == wire_shape, field, ": decoded shape ", ShapeText(labels.shape),
             ", wire shape ", ShapeText(wire_shape));
  FUZZ_CHECK(labels.size == ElementCount(labels.shape), field, ": ", labels.size,
             " elements for shape ", ShapeText(labels.shape));
  FUZZ_CHECK(labels.size == 0 || labels.data != nullptr, field, ": no data for ", labels.size,
             " elements");
  if (wire.has_shared_memory()) return;
  FUZZ_CHECK(static_cast<int64_t>(wire.data().size()) ==
                 labels.size * static_cast<int64_t>(sizeof(int64_t)),
             field, ": ", labels.size, " labels decoded from ", wire.data().size(), " bytes");
  FUZZ_CHECK(
      labels.size == 0 || std::memcmp(labels.data, wire.data().data(), wire.data().size()) == 0,
      field, ": the decoded labels differ from the wire bytes");
}

// The parameters are the wire's, by name.
inline void CheckParameters(const gradengine::ParameterViews& parameters,
                            const google::protobuf::RepeatedPtrField<grad::v1::NamedTensor>& wire) {
  FUZZ_CHECK(parameters.size() == static_cast<size_t>(wire.size()), parameters.size(),
             " parameters decoded from ", wire.size());
  for (int i = 0; i < wire.size(); ++i) {
    const auto it = parameters.find(wire[i].name());
    FUZZ_CHECK(it != parameters.end(), "parameters[", i, "] was not decoded");
    CheckView(it->second, wire[i].tensor(), absl::StrCat("parameters[", i, "].tensor"));
  }
}

template <typename EngineRequest, typename WireRequest>
void CheckDecodedCommon(const EngineRequest& request, const WireRequest& wire) {
  CheckNetwork(request.network, wire.network());
  CheckParameters(request.parameters, wire.parameters());
  CheckView(request.input, wire.input(), "input");
}

inline void CheckDecodedGradientParts(const gradengine::GradientRequest& request,
                                      const grad::v1::ComputeGradientsRequest& wire) {
  const grad::v1::Objective& objective = wire.objective();
  switch (request.objective.kind) {
    case gradengine::ObjectiveKind::kMse:
      FUZZ_CHECK(objective.has_mse_target() && !objective.has_sum() &&
                     !objective.has_grad_output() && !objective.has_cross_entropy(),
                 "decoded as MSE");
      CheckView(request.objective.tensor, objective.mse_target(), "objective.mse_target");
      break;
    case gradengine::ObjectiveKind::kSum:
      FUZZ_CHECK(objective.has_sum() && !objective.has_mse_target() &&
                     !objective.has_grad_output() && !objective.has_cross_entropy(),
                 "decoded as sum");
      FUZZ_CHECK(request.objective.tensor.shape.empty() && request.objective.tensor.size == 0,
                 "a sum objective with a tensor");
      break;
    case gradengine::ObjectiveKind::kGradOutput:
      FUZZ_CHECK(objective.has_grad_output() && !objective.has_sum() &&
                     !objective.has_mse_target() && !objective.has_cross_entropy(),
                 "decoded as grad_output");
      CheckView(request.objective.tensor, objective.grad_output(), "objective.grad_output");
      break;
    case gradengine::ObjectiveKind::kCrossEntropy:
      FUZZ_CHECK(objective.has_cross_entropy() && !objective.has_sum() &&
                     !objective.has_mse_target() && !objective.has_grad_output(),
                 "decoded as cross_entropy");
      CheckLabels(request.objective.labels, objective.cross_entropy().target(),
                  "objective.cross_entropy.target");
      FUZZ_CHECK(request.objective.ignore_index == (objective.cross_entropy().has_ignore_index()
                                                        ? objective.cross_entropy().ignore_index()
                                                        : -100),
                 "objective.cross_entropy.ignore_index");
      break;
  }
  const grad::v1::GradientSelection& selection = wire.gradients();
  FUZZ_CHECK(request.gradients.input == !selection.skip_input(), "gradients.input");
  FUZZ_CHECK(!(selection.no_parameters() && selection.parameters_size() > 0),
             "no_parameters and parameters both accepted");
  FUZZ_CHECK(request.gradients.all_parameters ==
                 (!selection.no_parameters() && selection.parameters_size() == 0),
             "gradients.all_parameters");
  FUZZ_CHECK(
      request.gradients.parameters.size() == static_cast<size_t>(selection.parameters_size()),
      "gradients.parameters");
}

// What a request that passed the engine's validation must be: shapes positive and within the
// limit, one output shape per layer, the parameters the network uses (every required one,
// perhaps optional ones, no other), at their shapes.
template <typename EngineRequest>
void CheckValidatedCommon(const gradengine::ValidatedNetwork& validated,
                          const EngineRequest& request, int64_t max_elements) {
  const auto check_shape = [max_elements](const std::vector<int64_t>& shape,
                                          const std::string& what) {
    // NCHW, or [N, F] from a linear layer on.
    FUZZ_CHECK(shape.size() == 4 || (what != "input" && shape.size() == 2), what, " ",
               ShapeText(shape), " has neither 4 nor 2 dims");
    for (int64_t dim : shape) FUZZ_CHECK(dim >= 1, what, " ", ShapeText(shape));
    const int64_t count = ElementCount(shape);
    FUZZ_CHECK(count >= 1 && count <= max_elements, what, " ", ShapeText(shape), " has ", count,
               " elements, limit ", max_elements);
  };
  check_shape(request.input.shape, "input");
  FUZZ_CHECK(validated.output_shapes.size() == request.network.layers.size(),
             validated.output_shapes.size(), " output shapes for ", request.network.layers.size(),
             " layers");
  for (size_t i = 0; i < validated.output_shapes.size(); ++i) {
    check_shape(validated.output_shapes[i], absl::StrCat("layers[", i, "] output"));
    FUZZ_CHECK(validated.output_shapes[i][0] == request.input.shape[0], "layers[", i,
               "] changed the batch");
  }
  size_t given = 0;
  for (const gradengine::ParameterInfo& parameter : validated.parameters) {
    const std::string& name = parameter.name;
    const std::vector<int64_t>& shape = parameter.shape;
    const auto it = request.parameters.find(name);
    if (it == request.parameters.end()) {
      FUZZ_CHECK(!parameter.required, "parameter \"", name, "\" passed but is missing");
    } else {
      ++given;
      FUZZ_CHECK(it->second.shape == shape, "parameter \"", name, "\" ",
                 ShapeText(it->second.shape), " passed for ", ShapeText(shape));
    }
    const int64_t count = ElementCount(shape);
    FUZZ_CHECK(count >= 0 && count <= max_elements, "parameter \"", name, "\" ", ShapeText(shape),
               " over the limit ", max_elements);
  }
  FUZZ_CHECK(given == request.parameters.size(), request.parameters.size() - given,
             " parameters given that the network does not use");
}

inline void CheckValidatedGradientParts(const gradengine::ValidatedNetwork& validated,
                                        const gradengine::GradientRequest& request) {
  const std::vector<int64_t>& output = validated.output_shapes.back();
  switch (request.objective.kind) {
    case gradengine::ObjectiveKind::kMse:
    case gradengine::ObjectiveKind::kGradOutput:
      FUZZ_CHECK(request.objective.tensor.shape == output, "objective tensor ",
                 ShapeText(request.objective.tensor.shape), " passed for output ",
                 ShapeText(output));
      break;
    case gradengine::ObjectiveKind::kCrossEntropy: {
      // Logits [N, C, ...] take labels [N, ...].
      std::vector<int64_t> labels_shape = output;
      if (labels_shape.size() >= 2) labels_shape.erase(labels_shape.begin() + 1);
      FUZZ_CHECK(request.objective.labels.shape == labels_shape, "labels ",
                 ShapeText(request.objective.labels.shape), " passed for output ",
                 ShapeText(output));
      break;
    }
    case gradengine::ObjectiveKind::kSum:
      break;
  }
  for (const std::string& name : request.gradients.parameters) {
    FUZZ_CHECK(request.parameters.count(name) == 1, "gradients.parameters names \"", name,
               "\", not a parameter");
  }
}

}  // namespace gradfuzz

#endif  // TESTS_FUZZ_REQUEST_CHECKS_H_
