#include "proto/wire.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <variant>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"
#include "gradengine/overloaded.h"
#include "gradengine/quote.h"

namespace gradwire {
namespace {

static_assert(sizeof(float) == 4, "FLOAT32 tensors are 4-byte IEEE 754 values");
static_assert(sizeof(int64_t) == 8, "INT64 tensors are 8-byte two's complement values");
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "tensor bytes are little-endian on the wire and are used in place");

using gradengine::ActivationKind;
using gradengine::ActivationSpec;
using gradengine::AddSpec;
using gradengine::AvgPool2dSpec;
using gradengine::BatchNorm2dSpec;
using gradengine::Conv2dSpec;
using gradengine::LayerSpec;
using gradengine::LinearSpec;
using gradengine::MaxPool2dSpec;
using gradengine::NetworkSpec;
using gradengine::ObjectiveKind;
using gradengine::Tensor;
using gradengine::TensorView;

using gradengine::Overloaded;

// The wire enum for each engine activation, and back.
constexpr std::pair<ActivationKind, grad::v1::ActivationKind> kActivations[] = {
    {ActivationKind::kRelu, grad::v1::RELU},
    {ActivationKind::kLeakyRelu, grad::v1::LEAKY_RELU},
    {ActivationKind::kTanh, grad::v1::TANH},
    {ActivationKind::kSigmoid, grad::v1::SIGMOID},
    {ActivationKind::kElu, grad::v1::ELU},
    {ActivationKind::kGeluErf, grad::v1::GELU},
    {ActivationKind::kGeluTanh, grad::v1::GELU_TANH},
};

std::string DataTypeText(int dtype) {
  if (grad::v1::DataType_IsValid(dtype)) {
    return absl::StrCat(dtype, " (", grad::v1::DataType_Name(dtype), ")");
  }
  return absl::StrCat(dtype);
}

// The number of bytes of a tensor of `shape` with `element_bytes` per element; errors name
// `field`.
absl::StatusOr<int64_t> CheckedByteCount(const grad::v1::Tensor& tensor, absl::string_view field,
                                         int64_t element_bytes) {
  int64_t elements = 1;
  for (int i = 0; i < tensor.shape_size(); ++i) {
    const int64_t dim = tensor.shape(i);
    if (dim < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".shape[", i, "]=", dim, " must be >= 0"));
    }
    if (dim != 0 && elements > std::numeric_limits<int64_t>::max() / element_bytes / dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".shape=[", absl::StrJoin(tensor.shape(), ", "),
          "] has more elements than a 64-bit byte count can hold"));
    }
    elements *= dim;
  }
  return elements * element_bytes;
}

absl::Status CheckDataType(const grad::v1::Tensor& tensor, absl::string_view field) {
  switch (tensor.dtype()) {
    case grad::v1::DATA_TYPE_FLOAT32:
      return absl::OkStatus();
    case grad::v1::DATA_TYPE_BFLOAT16:
      return absl::UnimplementedError(
          absl::StrCat(field, ".dtype=", DataTypeText(tensor.dtype()),
                       " is not supported yet; send DATA_TYPE_FLOAT32"));
    case grad::v1::DATA_TYPE_INT64:
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".dtype=", DataTypeText(tensor.dtype()),
                       " is only for class indices (objective.cross_entropy.target); send "
                       "DATA_TYPE_FLOAT32"));
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".dtype=", DataTypeText(tensor.dtype()),
                       " is not a supported data type; send DATA_TYPE_FLOAT32"));
  }
}

// Checks shape and byte count for elements of `element_bytes` (of `dtype_name`); returns the
// element count. A tensor that names shared memory must carry no data and a byte_size equal to
// what its shape needs.
absl::StatusOr<int64_t> CheckTensorBytes(const grad::v1::Tensor& tensor, absl::string_view field,
                                         int64_t element_bytes, absl::string_view dtype_name) {
  absl::StatusOr<int64_t> bytes = CheckedByteCount(tensor, field, element_bytes);
  if (!bytes.ok()) return bytes.status();
  if (tensor.has_shared_memory()) {
    if (!tensor.data().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, " has both data (", tensor.data().size(), " bytes) and shared_memory; set one"));
    }
    if (tensor.shared_memory().byte_size() != *bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".shared_memory.byte_size=", tensor.shared_memory().byte_size(),
          ", but shape=[", absl::StrJoin(tensor.shape(), ", "),
          "] of ", dtype_name, " needs ", *bytes));
    }
  } else if (static_cast<int64_t>(tensor.data().size()) != *bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".data has ", tensor.data().size(), " bytes, but shape=[",
        absl::StrJoin(tensor.shape(), ", "), "] of ", dtype_name, " needs ", *bytes));
  }
  return *bytes / element_bytes;
}

// Checks a FLOAT32 tensor's dtype, shape and byte count; returns the element count.
absl::StatusOr<int64_t> CheckTensor(const grad::v1::Tensor& tensor, absl::string_view field) {
  if (absl::Status s = CheckDataType(tensor, field); !s.ok()) return s;
  return CheckTensorBytes(tensor, field, sizeof(float), "DATA_TYPE_FLOAT32");
}

// The memory `ref` (at path `field`) names, recorded in `storage` for the overlap check.
absl::StatusOr<SharedMemorySpan> ResolveShared(const grad::v1::SharedMemoryRef& ref,
                                               const std::string& field, bool written,
                                               DecodeStorage* storage) {
  if (storage->shared_memory == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, " names shared memory, but ", storage->shared_memory_refusal));
  }
  absl::StatusOr<SharedMemorySpan> span = storage->shared_memory->Resolve(ref, field);
  if (!span.ok()) return span.status();
  storage->shared_ranges.push_back({field, span->file_id, span->file_offset,
                                    span->file_offset + ref.byte_size(), written});
  return span;
}

// No memory a result is written to may overlap any other tensor of the call. Sorted by
// (file, begin) and swept, so that a request with many references costs O(n log n).
absl::Status CheckSharedOverlaps(const DecodeStorage& storage) {
  std::vector<const DecodeStorage::UsedRange*> ranges;
  ranges.reserve(storage.shared_ranges.size());
  for (const DecodeStorage::UsedRange& range : storage.shared_ranges) {
    if (range.end > range.begin) ranges.push_back(&range);  // empty tensors hold no bytes
  }
  std::sort(ranges.begin(), ranges.end(), [](const auto* a, const auto* b) {
    return std::tie(a->file_id, a->begin) < std::tie(b->file_id, b->begin);
  });
  // Among the ranges seen so far in this file: the one reaching furthest, and the written one
  // reaching furthest. A range overlaps an earlier one iff it begins before that one's end.
  const DecodeStorage::UsedRange* furthest = nullptr;
  const DecodeStorage::UsedRange* furthest_written = nullptr;
  for (const DecodeStorage::UsedRange* range : ranges) {
    if (furthest != nullptr && furthest->file_id != range->file_id) {
      furthest = furthest_written = nullptr;
    }
    const DecodeStorage::UsedRange* other = nullptr;
    if (range->written && furthest != nullptr && range->begin < furthest->end) other = furthest;
    if (!range->written && furthest_written != nullptr && range->begin < furthest_written->end) {
      other = furthest_written;
    }
    if (other != nullptr) {
      const auto& written = range->written ? *range : *other;
      const auto& rest = range->written ? *other : *range;
      return absl::InvalidArgumentError(
          absl::StrCat(written.field, " overlaps ", rest.field,
                       " in shared memory; a result must not share bytes with another tensor"));
    }
    if (furthest == nullptr || range->end > furthest->end) furthest = range;
    if (range->written && (furthest_written == nullptr || range->end > furthest_written->end)) {
      furthest_written = range;
    }
  }
  return absl::OkStatus();
}

// A ResultPlacement's one location: `size` floats of shared memory to write.
absl::StatusOr<gradengine::ResultMemory> DecodeResultMemory(const grad::v1::SharedMemoryRef& ref,
                                                            const std::string& field,
                                                            DecodeStorage* storage) {
  if (ref.byte_size() <= 0 || ref.byte_size() % static_cast<int64_t>(sizeof(float)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".byte_size=", ref.byte_size(), " must be a positive multiple of 4 (FLOAT32)"));
  }
  absl::StatusOr<SharedMemorySpan> span = ResolveShared(ref, field, /*written=*/true, storage);
  if (!span.ok()) return span.status();
  return gradengine::ResultMemory{span->data, ref.byte_size() / static_cast<int64_t>(sizeof(float)),
                                  std::move(span->owner)};
}

absl::Status DecodePlacement(const grad::v1::ResultPlacement& placement, bool gradients,
                             DecodeStorage* storage, gradengine::ResultPlacement* out) {
  if (placement.has_output()) {
    absl::StatusOr<gradengine::ResultMemory> memory =
        DecodeResultMemory(placement.output(), "placement.output", storage);
    if (!memory.ok()) return memory.status();
    out->output = *std::move(memory);
  }
  if (!gradients && (placement.has_input_grad() || placement.parameter_grads_size() > 0)) {
    return absl::InvalidArgumentError(
        "placement names gradients, but Forward computes none; set only placement.output");
  }
  if (placement.has_input_grad()) {
    absl::StatusOr<gradengine::ResultMemory> memory =
        DecodeResultMemory(placement.input_grad(), "placement.input_grad", storage);
    if (!memory.ok()) return memory.status();
    out->input_grad = *std::move(memory);
  }
  for (int i = 0; i < placement.parameter_grads_size(); ++i) {
    const grad::v1::NamedSharedMemoryRef& named = placement.parameter_grads(i);
    const std::string field = absl::StrCat("placement.parameter_grads[", i, "]");
    if (named.name().empty()) return absl::InvalidArgumentError(absl::StrCat(field, ".name is empty"));
    if (out->parameter_grads.count(named.name()) > 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".name=", gradengine::Quote(named.name()),
                                                     " repeats an earlier entry"));
    }
    absl::StatusOr<gradengine::ResultMemory> memory =
        DecodeResultMemory(named.ref(), field + ".ref", storage);
    if (!memory.ok()) return memory.status();
    out->parameter_grads.emplace(named.name(), *std::move(memory));
  }
  return absl::OkStatus();
}

// Reads a PyTorch-style int-or-pair field: [v] means (v, v), [a, b] means (a, b); empty gives
// the default.
absl::Status DecodePair(const google::protobuf::RepeatedField<int64_t>& values,
                        const std::string& field, int64_t default_value, int64_t* first,
                        int64_t* second) {
  switch (values.size()) {
    case 0:
      *first = *second = default_value;
      return absl::OkStatus();
    case 1:
      *first = *second = values[0];
      return absl::OkStatus();
    case 2:
      *first = values[0];
      *second = values[1];
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " has ", values.size(), " values [", absl::StrJoin(values, ", "),
                       "]; expected 1 or 2"));
  }
}

absl::StatusOr<Conv2dSpec> DecodeConv2d(const grad::v1::Conv2d& conv, const std::string& prefix) {
  Conv2dSpec spec;
  spec.in_channels = conv.in_channels();
  spec.out_channels = conv.out_channels();
  if (conv.kernel_size().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "kernel_size is not set; give [k] or [kh, kw]"));
  }
  if (absl::Status s =
          DecodePair(conv.kernel_size(), prefix + "kernel_size", 0, &spec.kernel_h, &spec.kernel_w);
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          DecodePair(conv.stride(), prefix + "stride", 1, &spec.stride_h, &spec.stride_w);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = DecodePair(conv.dilation(), prefix + "dilation", 1, &spec.dilation_h,
                                  &spec.dilation_w);
      !s.ok()) {
    return s;
  }
  const auto& pad = conv.padding();
  switch (pad.size()) {
    case 0:
      break;
    case 1:
      spec.pad_top = spec.pad_bottom = spec.pad_left = spec.pad_right = pad[0];
      break;
    case 2:
      spec.pad_top = spec.pad_bottom = pad[0];
      spec.pad_left = spec.pad_right = pad[1];
      break;
    case 4:
      spec.pad_top = pad[0];
      spec.pad_bottom = pad[1];
      spec.pad_left = pad[2];
      spec.pad_right = pad[3];
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "padding has ", pad.size(), " values [", absl::StrJoin(pad, ", "),
                       "]; expected 1, 2 or 4 (top, bottom, left, right)"));
  }
  spec.groups = conv.groups() == 0 ? 1 : conv.groups();
  spec.bias = conv.bias();
  return spec;
}

absl::StatusOr<ActivationSpec> DecodeActivation(const grad::v1::Activation& activation,
                                                const std::string& prefix) {
  for (const auto& [engine_kind, wire_kind] : kActivations) {
    if (activation.kind() == wire_kind) return ActivationSpec{engine_kind, activation.alpha()};
  }
  const int kind = activation.kind();
  return absl::InvalidArgumentError(absl::StrCat(
      prefix, "kind=", kind,
      grad::v1::ActivationKind_IsValid(kind)
          ? absl::StrCat(" (", grad::v1::ActivationKind_Name(kind), ")")
          : std::string(),
      " is not an activation; expected one of ", absl::StrJoin(SupportedActivationNames(), ", ")));
}

grad::v1::ActivationKind EncodeActivationKind(ActivationKind kind) {
  for (const auto& [engine_kind, wire_kind] : kActivations) {
    if (engine_kind == kind) return wire_kind;
  }
  return grad::v1::ACTIVATION_KIND_UNSPECIFIED;
}

// The kernel_size, stride and padding both pooling messages have; the stride defaults to the
// kernel, as in PyTorch.
template <typename WirePool, typename Spec>
absl::Status DecodePoolWindow(const WirePool& pool, const std::string& prefix, Spec* spec) {
  if (pool.kernel_size().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "kernel_size is not set; give [k] or [kh, kw]"));
  }
  if (absl::Status s = DecodePair(pool.kernel_size(), prefix + "kernel_size", 0, &spec->kernel_h,
                                  &spec->kernel_w);
      !s.ok()) {
    return s;
  }
  if (pool.stride().empty()) {
    spec->stride_h = spec->kernel_h;
    spec->stride_w = spec->kernel_w;
  } else if (absl::Status s = DecodePair(pool.stride(), prefix + "stride", 0, &spec->stride_h,
                                         &spec->stride_w);
             !s.ok()) {
    return s;
  }
  return DecodePair(pool.padding(), prefix + "padding", 0, &spec->pad_h, &spec->pad_w);
}

absl::StatusOr<MaxPool2dSpec> DecodeMaxPool2d(const grad::v1::MaxPool2d& pool,
                                              const std::string& prefix) {
  MaxPool2dSpec spec;
  if (absl::Status s = DecodePoolWindow(pool, prefix, &spec); !s.ok()) return s;
  if (absl::Status s = DecodePair(pool.dilation(), prefix + "dilation", 1, &spec.dilation_h,
                                  &spec.dilation_w);
      !s.ok()) {
    return s;
  }
  spec.ceil_mode = pool.ceil_mode();
  return spec;
}

absl::StatusOr<AvgPool2dSpec> DecodeAvgPool2d(const grad::v1::AvgPool2d& pool,
                                              const std::string& prefix) {
  AvgPool2dSpec spec;
  if (absl::Status s = DecodePoolWindow(pool, prefix, &spec); !s.ok()) return s;
  spec.ceil_mode = pool.ceil_mode();
  spec.count_include_pad = !pool.has_count_include_pad() || pool.count_include_pad();
  return spec;
}

absl::StatusOr<BatchNorm2dSpec> DecodeBatchNorm2d(const grad::v1::BatchNorm2d& norm,
                                                  const std::string& prefix) {
  // No default: which statistics normalise is the difference between model.train() and
  // model.eval(), and a guess would silently compute the other one.
  if (!norm.has_training()) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "training is not set; it is required: true normalises with the batch's "
                "statistics (model.train()), false with the running ones (model.eval())"));
  }
  BatchNorm2dSpec spec;
  spec.num_features = norm.num_features();
  if (norm.has_eps()) spec.eps = norm.eps();
  if (norm.has_momentum()) spec.momentum = norm.momentum();
  if (norm.has_affine()) spec.affine = norm.affine();
  spec.training = norm.training();
  return spec;
}

LinearSpec DecodeLinear(const grad::v1::Linear& linear) {
  LinearSpec spec;
  spec.in_features = linear.in_features();
  spec.out_features = linear.out_features();
  spec.bias = linear.bias();
  return spec;
}

// The wire form of every layer kind.
void EncodeLayerOp(const gradengine::LayerOp& op, grad::v1::Layer* wire) {
  std::visit(
      Overloaded{
          [wire](const Conv2dSpec& conv) {
            grad::v1::Conv2d* c = wire->mutable_conv2d();
            c->set_in_channels(conv.in_channels);
            c->set_out_channels(conv.out_channels);
            c->add_kernel_size(conv.kernel_h);
            c->add_kernel_size(conv.kernel_w);
            c->add_stride(conv.stride_h);
            c->add_stride(conv.stride_w);
            for (int64_t p : {conv.pad_top, conv.pad_bottom, conv.pad_left, conv.pad_right}) {
              c->add_padding(p);
            }
            c->add_dilation(conv.dilation_h);
            c->add_dilation(conv.dilation_w);
            c->set_groups(conv.groups);
            c->set_bias(conv.bias);
          },
          [wire](const ActivationSpec& act) {
            grad::v1::Activation* a = wire->mutable_activation();
            a->set_kind(EncodeActivationKind(act.kind));
            a->set_alpha(act.alpha);
          },
          [wire](const MaxPool2dSpec& pool) {
            grad::v1::MaxPool2d* m = wire->mutable_max_pool2d();
            m->add_kernel_size(pool.kernel_h);
            m->add_kernel_size(pool.kernel_w);
            m->add_stride(pool.stride_h);
            m->add_stride(pool.stride_w);
            m->add_padding(pool.pad_h);
            m->add_padding(pool.pad_w);
            m->add_dilation(pool.dilation_h);
            m->add_dilation(pool.dilation_w);
            m->set_ceil_mode(pool.ceil_mode);
          },
          [wire](const AvgPool2dSpec& pool) {
            grad::v1::AvgPool2d* a = wire->mutable_avg_pool2d();
            a->add_kernel_size(pool.kernel_h);
            a->add_kernel_size(pool.kernel_w);
            a->add_stride(pool.stride_h);
            a->add_stride(pool.stride_w);
            a->add_padding(pool.pad_h);
            a->add_padding(pool.pad_w);
            a->set_ceil_mode(pool.ceil_mode);
            a->set_count_include_pad(pool.count_include_pad);
          },
          [wire](const BatchNorm2dSpec& norm) {
            grad::v1::BatchNorm2d* b = wire->mutable_batch_norm2d();
            b->set_num_features(norm.num_features);
            b->set_eps(norm.eps);
            b->set_momentum(norm.momentum);
            b->set_affine(norm.affine);
            b->set_training(norm.training);
          },
          [wire](const LinearSpec& linear) {
            grad::v1::Linear* l = wire->mutable_linear();
            l->set_in_features(linear.in_features);
            l->set_out_features(linear.out_features);
            l->set_bias(linear.bias);
          },
          [wire](const AddSpec& add) { wire->mutable_add()->set_other(add.other); },
      },
      op);
}

// The INT64 header of `labels` (shape and dtype), and its bytes if `data`.
void EncodeLabels(const gradengine::LabelsView& labels, bool data, grad::v1::Tensor* out) {
  out->mutable_shape()->Assign(labels.shape.begin(), labels.shape.end());
  out->set_dtype(grad::v1::DATA_TYPE_INT64);
  if (data && labels.size > 0) {
    out->mutable_data()->assign(reinterpret_cast<const char*>(labels.data),
                                static_cast<size_t>(labels.size) * sizeof(int64_t));
  }
}

// A view of the class indices in `tensor`, which must be an INT64 tensor; copied into
// `storage` only if misaligned, as DecodeTensorView does for floats.
absl::StatusOr<gradengine::LabelsView> DecodeLabels(const grad::v1::Tensor& tensor,
                                                    const std::string& field,
                                                    DecodeStorage* storage) {
  if (tensor.dtype() != grad::v1::DATA_TYPE_INT64) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".dtype=", DataTypeText(tensor.dtype()),
                     " cannot hold class indices; send DATA_TYPE_INT64"));
  }
  absl::StatusOr<int64_t> elements =
      CheckTensorBytes(tensor, field, sizeof(int64_t), "DATA_TYPE_INT64");
  if (!elements.ok()) return elements.status();
  gradengine::LabelsView labels;
  labels.shape.assign(tensor.shape().begin(), tensor.shape().end());
  labels.size = *elements;
  const char* bytes = tensor.data().data();
  if (tensor.has_shared_memory()) {
    absl::StatusOr<SharedMemorySpan> span = ResolveShared(
        tensor.shared_memory(), absl::StrCat(field, ".shared_memory"), /*written=*/false, storage);
    if (!span.ok()) return span.status();
    bytes = reinterpret_cast<const char*>(span->data);
  }
  if (reinterpret_cast<uintptr_t>(bytes) % alignof(int64_t) == 0) {
    labels.data = reinterpret_cast<const int64_t*>(bytes);
  } else {
    std::vector<int64_t>& copy =
        storage->label_copies.emplace_back(static_cast<size_t>(*elements));
    if (*elements > 0) std::memcpy(copy.data(), bytes, copy.size() * sizeof(int64_t));
    labels.data = copy.data();
  }
  return labels;
}

absl::StatusOr<Tensor> TakeTensorOrShared(grad::v1::Tensor* tensor, absl::string_view field,
                                          SharedMemoryResolver* shared_memory);

// EncodeTensor, or only its header without `data`.
void EncodeTensorOrHeader(const TensorView& view, bool data, grad::v1::Tensor* out) {
  if (data) {
    EncodeTensor(view, out);
  } else {
    EncodeTensorHeader(view.shape, out);
  }
}

void EncodeParameters(const gradengine::ParameterViews& parameters, bool data,
                      google::protobuf::RepeatedPtrField<grad::v1::NamedTensor>* out) {
  out->Reserve(static_cast<int>(parameters.size()));
  for (const auto& [name, view] : parameters) {
    grad::v1::NamedTensor* named = out->Add();
    named->set_name(name);
    EncodeTensorOrHeader(view, data, named->mutable_tensor());
  }
}

// Results by name, as bytes.
void EncodeNamedTensors(const gradengine::ParameterTensors& tensors,
                        google::protobuf::RepeatedPtrField<grad::v1::NamedTensor>* out) {
  out->Reserve(static_cast<int>(tensors.size()));
  for (const auto& [name, tensor] : tensors) {
    grad::v1::NamedTensor* named = out->Add();
    named->set_name(name);
    EncodeTensor(tensor, named->mutable_tensor());
  }
}

absl::StatusOr<gradengine::ParameterViews> DecodeParameters(
    const google::protobuf::RepeatedPtrField<grad::v1::NamedTensor>& parameters,
    DecodeStorage* storage) {
  if (absl::Status s = gradengine::CheckCount("parameters", parameters.size(),
                                              gradengine::kMaxParameters);
      !s.ok()) {
    return s;
  }
  gradengine::ParameterViews views;
  absl::flat_hash_map<absl::string_view, int> first_index;
  for (int i = 0; i < parameters.size(); ++i) {
    const grad::v1::NamedTensor& named = parameters[i];
    const std::string field = absl::StrCat("parameters[", i, "]");
    if (absl::Status s = gradengine::CheckName(field + ".name", named.name()); !s.ok()) return s;
    auto [it, inserted] = first_index.emplace(named.name(), i);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".name=", gradengine::Quote(named.name()),
                                                     " repeats parameters[", it->second, "]"));
    }
    if (!named.has_tensor()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".tensor (", gradengine::Quote(named.name()), ") is not set"));
    }
    absl::StatusOr<TensorView> view =
        DecodeTensorView(named.tensor(), absl::StrCat(field, ".tensor"), storage);
    if (!view.ok()) return view.status();
    views.emplace(named.name(), *std::move(view));
  }
  return views;
}

absl::StatusOr<TensorView> DecodeRequiredTensor(bool present, const grad::v1::Tensor& tensor,
                                                absl::string_view field, DecodeStorage* storage) {
  if (!present) return absl::InvalidArgumentError(absl::StrCat(field, " is not set"));
  return DecodeTensorView(tensor, field, storage);
}

absl::StatusOr<gradengine::ParameterTensors> TakeNamedTensors(
    google::protobuf::RepeatedPtrField<grad::v1::NamedTensor>* tensors, absl::string_view field,
    SharedMemoryResolver* shared_memory) {
  gradengine::ParameterTensors out;
  for (int i = 0; i < tensors->size(); ++i) {
    grad::v1::NamedTensor* named = tensors->Mutable(i);
    const std::string path = absl::StrCat(field, "[", i, "]");
    absl::StatusOr<Tensor> tensor =
        TakeTensorOrShared(named->mutable_tensor(), path + ".tensor", shared_memory);
    if (!tensor.ok()) return tensor.status();
    if (!out.emplace(named->name(), *std::move(tensor)).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ".name=", gradengine::Quote(named->name()), " repeats an earlier entry"));
    }
  }
  return out;
}

// The fields Forward and ComputeGradients requests share.
template <typename WireRequest, typename EngineRequest>
absl::Status DecodeNetworkParametersInput(const WireRequest& request, DecodeStorage* storage,
                                          EngineRequest* out) {
  absl::StatusOr<NetworkSpec> network = DecodeNetwork(request.network());
  if (!network.ok()) return network.status();
  out->network = *std::move(network);
  absl::StatusOr<gradengine::ParameterViews> parameters =
      DecodeParameters(request.parameters(), storage);
  if (!parameters.ok()) return parameters.status();
  out->parameters = *std::move(parameters);
  absl::StatusOr<TensorView> input =
      DecodeRequiredTensor(request.has_input(), request.input(), "input", storage);
  if (!input.ok()) return input.status();
  out->input = *std::move(input);
  return absl::OkStatus();
}

// TakeTensor, resolving a SharedMemoryRef with `shared_memory` (the client's own regions).
absl::StatusOr<Tensor> TakeTensorOrShared(grad::v1::Tensor* tensor, absl::string_view field,
                                          SharedMemoryResolver* shared_memory) {
  absl::StatusOr<int64_t> elements = CheckTensor(*tensor, field);
  if (!elements.ok()) return elements.status();
  std::vector<int64_t> shape(tensor->shape().begin(), tensor->shape().end());
  const size_t count = static_cast<size_t>(*elements);
  if (tensor->has_shared_memory()) {
    const std::string ref_field = absl::StrCat(field, ".shared_memory");
    if (shared_memory == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(ref_field, " is set, but no shared memory region was given"));
    }
    absl::StatusOr<SharedMemorySpan> span = shared_memory->Resolve(tensor->shared_memory(), ref_field);
    if (!span.ok()) return span.status();
    return Tensor(std::move(shape), gradengine::TensorBuffer::Wrap(span->data, count, span->owner));
  }
  auto bytes = std::make_shared<std::string>();
  bytes->swap(*tensor->mutable_data());
  if (reinterpret_cast<uintptr_t>(bytes->data()) % alignof(float) != 0) {
    gradengine::TensorBuffer copy = gradengine::TensorBuffer::Uninitialized(count);
    if (count > 0) std::memcpy(copy.data(), bytes->data(), bytes->size());
    return Tensor(std::move(shape), std::move(copy));
  }
  float* data = reinterpret_cast<float*>(bytes->data());
  return Tensor(std::move(shape), gradengine::TensorBuffer::Wrap(data, count, std::move(bytes)));
}

}  // namespace

void EncodeTensorHeader(absl::Span<const int64_t> shape, grad::v1::Tensor* out) {
  out->mutable_shape()->Assign(shape.begin(), shape.end());
  out->set_dtype(grad::v1::DATA_TYPE_FLOAT32);
}

void EncodeTensor(absl::Span<const int64_t> shape, absl::Span<const float> values,
                  grad::v1::Tensor* out) {
  EncodeTensorHeader(shape, out);
  // One copy, straight from the floats; assign() does not zero-fill first.
  out->mutable_data()->assign(reinterpret_cast<const char*>(values.data()),
                              values.size() * sizeof(float));
}

absl::StatusOr<TensorView> DecodeTensorView(const grad::v1::Tensor& tensor,
                                            absl::string_view field, DecodeStorage* storage) {
  absl::StatusOr<int64_t> elements = CheckTensor(tensor, field);
  if (!elements.ok()) return elements.status();
  TensorView view;
  view.shape.assign(tensor.shape().begin(), tensor.shape().end());
  view.size = *elements;
  if (tensor.has_shared_memory()) {
    absl::StatusOr<SharedMemorySpan> span = ResolveShared(
        tensor.shared_memory(), absl::StrCat(field, ".shared_memory"), /*written=*/false, storage);
    if (!span.ok()) return span.status();
    view.data = span->data;
    return view;
  }
  const char* bytes = tensor.data().data();
  if (reinterpret_cast<uintptr_t>(bytes) % alignof(float) == 0) {
    view.data = reinterpret_cast<const float*>(bytes);
  } else {
    std::vector<float>& copy = storage->copies.emplace_back(static_cast<size_t>(*elements));
    std::memcpy(copy.data(), bytes, tensor.data().size());
    view.data = copy.data();
  }
  return view;
}

absl::StatusOr<Tensor> DecodeTensor(const grad::v1::Tensor& tensor, absl::string_view field) {
  grad::v1::Tensor copy = tensor;
  return TakeTensor(&copy, field);
}

absl::StatusOr<Tensor> TakeTensor(grad::v1::Tensor* tensor, absl::string_view field) {
  return TakeTensorOrShared(tensor, field, nullptr);
}

void EncodeNetwork(const NetworkSpec& network, grad::v1::Network* out) {
  out->clear_layers();
  for (const LayerSpec& layer : network.layers) {
    grad::v1::Layer* wire = out->add_layers();
    wire->set_name(layer.name);
    EncodeLayerOp(layer.op, wire);
    wire->set_input(layer.input);
  }
}

absl::StatusOr<NetworkSpec> DecodeNetwork(const grad::v1::Network& network) {
  if (absl::Status s =
          gradengine::CheckCount("layers", network.layers_size(), gradengine::kMaxLayers);
      !s.ok()) {
    return s;
  }
  if (const size_t bytes = network.ByteSizeLong(); bytes > kMaxNetworkSpecBytes) {
    return absl::ResourceExhaustedError(absl::StrCat("network has ", bytes, " bytes; at most ",
                                                     kMaxNetworkSpecBytes, " are allowed"));
  }
  NetworkSpec spec;
  spec.layers.reserve(network.layers_size());
  for (int i = 0; i < network.layers_size(); ++i) {
    const grad::v1::Layer& layer = network.layers(i);
    const std::string prefix = absl::StrCat("layers[", i, "]");
    LayerSpec out;
    out.name = layer.name();
    out.input = layer.input();
    switch (layer.op_case()) {
      case grad::v1::Layer::kConv2D: {
        absl::StatusOr<Conv2dSpec> conv = DecodeConv2d(layer.conv2d(), prefix + ".conv2d.");
        if (!conv.ok()) return conv.status();
        out.op = *conv;
        break;
      }
      case grad::v1::Layer::kActivation: {
        absl::StatusOr<ActivationSpec> act =
            DecodeActivation(layer.activation(), prefix + ".activation.");
        if (!act.ok()) return act.status();
        out.op = *act;
        break;
      }
      case grad::v1::Layer::kMaxPool2D: {
        absl::StatusOr<MaxPool2dSpec> pool =
            DecodeMaxPool2d(layer.max_pool2d(), prefix + ".max_pool2d.");
        if (!pool.ok()) return pool.status();
        out.op = *pool;
        break;
      }
      case grad::v1::Layer::kAvgPool2D: {
        absl::StatusOr<AvgPool2dSpec> pool =
            DecodeAvgPool2d(layer.avg_pool2d(), prefix + ".avg_pool2d.");
        if (!pool.ok()) return pool.status();
        out.op = *pool;
        break;
      }
      case grad::v1::Layer::kBatchNorm2D: {
        absl::StatusOr<BatchNorm2dSpec> norm =
            DecodeBatchNorm2d(layer.batch_norm2d(), prefix + ".batch_norm2d.");
        if (!norm.ok()) return norm.status();
        out.op = *norm;
        break;
      }
      case grad::v1::Layer::kLinear:
        out.op = DecodeLinear(layer.linear());
        break;
      case grad::v1::Layer::kAdd:
        out.op = AddSpec{layer.add().other()};
        break;
      case grad::v1::Layer::OP_NOT_SET: {
        const google::protobuf::UnknownFieldSet& unknown =
            layer.GetReflection()->GetUnknownFields(layer);
        if (unknown.field_count() > 0) {
          return absl::UnimplementedError(absl::StrCat(
              prefix, " (", gradengine::Quote(layer.name()),
              ") has an op this server does not know (field ",
              unknown.field(0).number(), "); it supports ",
              absl::StrJoin(SupportedLayerNames(), ", ")));
        }
        return absl::InvalidArgumentError(absl::StrCat(
            prefix, ".op (", gradengine::Quote(layer.name()), ") is not set; set one of ",
            absl::StrJoin(SupportedLayerNames(), ", ")));
      }
    }
    spec.layers.push_back(std::move(out));
  }
  return spec;
}

void EncodeForwardRequest(const gradengine::ForwardRequest& request,
                          grad::v1::ForwardRequest* out, bool tensor_data) {
  EncodeNetwork(request.network, out->mutable_network());
  EncodeParameters(request.parameters, tensor_data, out->mutable_parameters());
  EncodeTensorOrHeader(request.input, tensor_data, out->mutable_input());
}

void EncodeGradientRequest(const gradengine::GradientRequest& request,
                           grad::v1::ComputeGradientsRequest* out, bool tensor_data) {
  EncodeNetwork(request.network, out->mutable_network());
  EncodeParameters(request.parameters, tensor_data, out->mutable_parameters());
  EncodeTensorOrHeader(request.input, tensor_data, out->mutable_input());
  grad::v1::Objective* objective = out->mutable_objective();
  switch (request.objective.kind) {
    case ObjectiveKind::kMse:
      EncodeTensorOrHeader(request.objective.tensor, tensor_data, objective->mutable_mse_target());
      break;
    case ObjectiveKind::kSum:
      objective->mutable_sum();
      break;
    case ObjectiveKind::kGradOutput:
      EncodeTensorOrHeader(request.objective.tensor, tensor_data,
                           objective->mutable_grad_output());
      break;
    case ObjectiveKind::kCrossEntropy: {
      grad::v1::CrossEntropy* cross_entropy = objective->mutable_cross_entropy();
      EncodeLabels(request.objective.labels, tensor_data, cross_entropy->mutable_target());
      cross_entropy->set_label_smoothing(request.objective.label_smoothing);
      cross_entropy->set_ignore_index(request.objective.ignore_index);
      break;
    }
  }
  grad::v1::GradientSelection* selection = out->mutable_gradients();
  selection->set_skip_input(!request.gradients.input);
  if (!request.gradients.all_parameters) {
    if (request.gradients.parameters.empty()) {
      selection->set_no_parameters(true);
    } else {
      for (const std::string& name : request.gradients.parameters) {
        selection->add_parameters(name);
      }
    }
  }
}

absl::StatusOr<gradengine::ForwardRequest> DecodeForwardRequest(
    const grad::v1::ForwardRequest& request, DecodeStorage* storage) {
  gradengine::ForwardRequest out;
  if (absl::Status s = DecodeNetworkParametersInput(request, storage, &out); !s.ok()) return s;
  if (absl::Status s =
          DecodePlacement(request.placement(), /*gradients=*/false, storage, &out.placement);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckSharedOverlaps(*storage); !s.ok()) return s;
  return out;
}

absl::StatusOr<gradengine::GradientRequest> DecodeGradientRequest(
    const grad::v1::ComputeGradientsRequest& request, DecodeStorage* storage) {
  gradengine::GradientRequest out;
  if (absl::Status s = DecodeNetworkParametersInput(request, storage, &out); !s.ok()) return s;

  const grad::v1::Objective& objective = request.objective();
  std::vector<std::string> set;
  if (objective.has_mse_target()) set.push_back("mse_target");
  if (objective.has_sum()) set.push_back("sum");
  if (objective.has_grad_output()) set.push_back("grad_output");
  if (objective.has_cross_entropy()) set.push_back("cross_entropy");
  if (set.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "objective has ", set.empty() ? "none" : absl::StrJoin(set, " and "),
        " set; set exactly one of mse_target, sum, grad_output, cross_entropy"));
  }
  if (objective.has_mse_target()) {
    out.objective.kind = ObjectiveKind::kMse;
    absl::StatusOr<TensorView> target =
        DecodeTensorView(objective.mse_target(), "objective.mse_target", storage);
    if (!target.ok()) return target.status();
    out.objective.tensor = *std::move(target);
  } else if (objective.has_sum()) {
    out.objective.kind = ObjectiveKind::kSum;
  } else if (objective.has_cross_entropy()) {
    const grad::v1::CrossEntropy& cross_entropy = objective.cross_entropy();
    out.objective.kind = ObjectiveKind::kCrossEntropy;
    if (!cross_entropy.has_target()) {
      return absl::InvalidArgumentError("objective.cross_entropy.target is not set");
    }
    absl::StatusOr<gradengine::LabelsView> labels =
        DecodeLabels(cross_entropy.target(), "objective.cross_entropy.target", storage);
    if (!labels.ok()) return labels.status();
    out.objective.labels = *std::move(labels);
    out.objective.label_smoothing = cross_entropy.label_smoothing();
    if (cross_entropy.has_ignore_index()) {
      out.objective.ignore_index = cross_entropy.ignore_index();
    }
  } else {
    out.objective.kind = ObjectiveKind::kGradOutput;
    absl::StatusOr<TensorView> grad_output =
        DecodeTensorView(objective.grad_output(), "objective.grad_output", storage);
    if (!grad_output.ok()) return grad_output.status();
    out.objective.tensor = *std::move(grad_output);
  }

  const grad::v1::GradientSelection& selection = request.gradients();
  if (absl::Status s = gradengine::CheckCount("gradients.parameters", selection.parameters_size(),
                                              gradengine::kMaxParameters);
      !s.ok()) {
    return s;
  }
  out.gradients.input = !selection.skip_input();
  if (selection.no_parameters() && !selection.parameters().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gradients.no_parameters is set, but gradients.parameters names ",
        selection.parameters_size(), " (", gradengine::Quote(selection.parameters(0)),
        ", ...); set one"));
  }
  out.gradients.all_parameters = !selection.no_parameters() && selection.parameters().empty();
  out.gradients.parameters.assign(selection.parameters().begin(), selection.parameters().end());
  if (request.skip_output() && request.placement().has_output()) {
    return absl::InvalidArgumentError(
        "skip_output is set, but placement.output names where the output goes; set one");
  }
  if (absl::Status s =
          DecodePlacement(request.placement(), /*gradients=*/true, storage, &out.placement);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckSharedOverlaps(*storage); !s.ok()) return s;
  return out;
}

void EncodeForwardResult(const gradengine::ForwardResult& result,
                         grad::v1::ForwardResponse* out) {
  EncodeTensor(result.output, out->mutable_output());
  EncodeNamedTensors(result.running_stats, out->mutable_running_stats());
}

void EncodeGradientResult(const gradengine::GradientResult& result, bool include_output,
                          grad::v1::ComputeGradientsResponse* out) {
  if (include_output) EncodeTensor(result.output, out->mutable_output());
  if (result.loss.has_value()) out->set_loss(*result.loss);
  if (result.input_grad.has_value()) EncodeTensor(*result.input_grad, out->mutable_input_grad());
  EncodeNamedTensors(result.parameter_grads, out->mutable_parameter_grads());
  EncodeNamedTensors(result.running_stats, out->mutable_running_stats());
}

absl::StatusOr<gradengine::ForwardResult> TakeForwardResult(grad::v1::ForwardResponse* response,
                                                            SharedMemoryResolver* shared_memory) {
  absl::StatusOr<Tensor> output =
      TakeTensorOrShared(response->mutable_output(), "output", shared_memory);
  if (!output.ok()) return output.status();
  gradengine::ForwardResult result;
  result.output = *std::move(output);
  // Running statistics always come as bytes: no resolver.
  absl::StatusOr<gradengine::ParameterTensors> running_stats =
      TakeNamedTensors(response->mutable_running_stats(), "running_stats", nullptr);
  if (!running_stats.ok()) return running_stats.status();
  result.running_stats = *std::move(running_stats);
  result.timing.forward_ns = response->timing().forward_ns();
  return result;
}

absl::StatusOr<gradengine::GradientResult> TakeGradientResult(
    grad::v1::ComputeGradientsResponse* response, SharedMemoryResolver* shared_memory) {
  gradengine::GradientResult result;
  result.timing.forward_ns = response->timing().forward_ns();
  result.timing.backward_ns = response->timing().backward_ns();
  if (response->has_output()) {
    absl::StatusOr<Tensor> output =
        TakeTensorOrShared(response->mutable_output(), "output", shared_memory);
    if (!output.ok()) return output.status();
    result.output = *std::move(output);
  }
  if (response->has_loss()) result.loss = response->loss();
  if (response->has_input_grad()) {
    absl::StatusOr<Tensor> input_grad =
        TakeTensorOrShared(response->mutable_input_grad(), "input_grad", shared_memory);
    if (!input_grad.ok()) return input_grad.status();
    result.input_grad = *std::move(input_grad);
  }
  absl::StatusOr<gradengine::ParameterTensors> grads =
      TakeNamedTensors(response->mutable_parameter_grads(), "parameter_grads", shared_memory);
  if (!grads.ok()) return grads.status();
  result.parameter_grads = *std::move(grads);
  absl::StatusOr<gradengine::ParameterTensors> running_stats =
      TakeNamedTensors(response->mutable_running_stats(), "running_stats", nullptr);
  if (!running_stats.ok()) return running_stats.status();
  result.running_stats = *std::move(running_stats);
  return result;
}

absl::StatusOr<gradengine::ForwardResult> DecodeForwardResult(
    const grad::v1::ForwardResponse& response) {
  grad::v1::ForwardResponse copy = response;
  return TakeForwardResult(&copy);
}

absl::StatusOr<gradengine::GradientResult> DecodeGradientResult(
    const grad::v1::ComputeGradientsResponse& response) {
  grad::v1::ComputeGradientsResponse copy = response;
  return TakeGradientResult(&copy);
}

std::vector<std::string> SupportedActivationNames() {
  std::vector<std::string> names;
  for (const auto& [engine_kind, wire_kind] : kActivations) {
    names.push_back(gradengine::ActivationName(engine_kind));
  }
  return names;
}

namespace {

// LayerKindName of every alternative of LayerOp, in the variant's order.
template <size_t... I>
std::vector<std::string> LayerKindNames(std::index_sequence<I...>) {
  return {gradengine::LayerKindName(gradengine::LayerOp(std::in_place_index<I>))...};
}

}  // namespace

std::vector<std::string> SupportedLayerNames() {
  return LayerKindNames(std::make_index_sequence<std::variant_size_v<gradengine::LayerOp>>());
}

std::vector<std::string> SupportedObjectiveNames() {
  return {gradengine::ObjectiveName(ObjectiveKind::kMse),
          gradengine::ObjectiveName(ObjectiveKind::kSum),
          gradengine::ObjectiveName(ObjectiveKind::kGradOutput),
          gradengine::ObjectiveName(ObjectiveKind::kCrossEntropy)};
}

namespace {

// Whether `bytes` are well-formed UTF-8 (no overlong forms, surrogates or code points past
// U+10FFFF), as protobuf checks proto3 strings.
bool IsUtf8(absl::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    const unsigned char c = static_cast<unsigned char>(bytes[i]);
    int extra = 0;
    uint32_t code = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      extra = 1;
      code = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      extra = 2;
      code = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      extra = 3;
      code = c & 0x07;
    } else {
      return false;
    }
    if (i + extra >= bytes.size()) return false;  // cut short
    for (int k = 1; k <= extra; ++k) {
      const unsigned char next = static_cast<unsigned char>(bytes[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      code = (code << 6) | (next & 0x3F);
    }
    if ((extra == 2 && (code < 0x800 || (code >= 0xD800 && code <= 0xDFFF))) ||
        (extra == 3 && (code < 0x10000 || code > 0x10FFFF))) {
      return false;
    }
    i += extra + 1;
  }
  return true;
}

// Nesting beyond this is not followed (protobuf's own parser stops at 100).
constexpr int kMaxUtf8SearchDepth = 100;

std::string FindInvalidUtf8In(const google::protobuf::Descriptor& type,
                              google::protobuf::io::CodedInputStream* in,
                              const std::string& prefix, int depth) {
  using google::protobuf::FieldDescriptor;
  using google::protobuf::internal::WireFormatLite;
  absl::flat_hash_map<int, int> seen;  // field number -> occurrences, for repeated indices
  while (const uint32_t tag = in->ReadTag()) {
    const int number = static_cast<int>(WireFormatLite::GetTagFieldNumber(tag));
    const FieldDescriptor* field = type.FindFieldByNumber(number);
    if (field == nullptr ||
        WireFormatLite::GetTagWireType(tag) != WireFormatLite::WIRETYPE_LENGTH_DELIMITED ||
        (field->type() != FieldDescriptor::TYPE_STRING &&
         field->type() != FieldDescriptor::TYPE_MESSAGE)) {
      if (!WireFormatLite::SkipField(in, tag)) return "";
      continue;
    }
    const int index = seen[number]++;
    const std::string path =
        absl::StrCat(prefix, field->name(),
                     field->is_repeated() ? absl::StrCat("[", index, "]") : std::string());
    uint32_t length = 0;
    if (!in->ReadVarint32(&length)) return "";
    if (field->type() == FieldDescriptor::TYPE_STRING) {
      std::string value;
      if (!in->ReadString(&value, static_cast<int>(length))) return "";
      if (!IsUtf8(value)) return path;
      continue;
    }
    if (depth >= kMaxUtf8SearchDepth) return "";
    const google::protobuf::io::CodedInputStream::Limit limit =
        in->PushLimit(static_cast<int>(length));
    std::string found = FindInvalidUtf8In(*field->message_type(), in, path + ".", depth + 1);
    if (!found.empty()) return found;
    if (!in->ConsumedEntireMessage()) return "";
    in->PopLimit(limit);
  }
  return "";
}

}  // namespace

std::string FindInvalidUtf8Field(const google::protobuf::Descriptor& type,
                                 google::protobuf::io::ZeroCopyInputStream* in) {
  google::protobuf::io::CodedInputStream coded(in);
  return FindInvalidUtf8In(type, &coded, "", 0);
}

}  // namespace gradwire
