// gradctl gradcheck: the service's gradients against central finite differences of its loss.
//
// One ComputeGradients call gives the analytical gradients of the input and of every trainable
// parameter (gradengine::LayerParameters). Then, for a random sample of coordinates of each of
// those tensors, the loss is evaluated through the server at x + h and x - h on that one
// coordinate, every other value unchanged, and the numeric derivative compared with the
// analytical one.
//
// The loss each probe evaluates is the server's own: a ComputeGradients call asking for no
// gradient (no parameters, no input) returns the loss the analytical gradients are of, computed
// in double from the float32 output exactly as in the gradient call, with batch norm in
// training mode normalising by the same batch statistics. A grad_output objective has no loss;
// its gradients are those of L = sum(output * grad_output), which gradcheck computes in double
// from the output the same call returns.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "client/gradctl/cli_util.h"
#include "client/gradctl/commands.h"
#include "client/gradctl/grad_request.h"
#include "gradclient/client.h"
#include "gradclient/npy.h"
#include "gradengine/network.h"
#include "gradengine/tensor.h"

namespace gradctl {
namespace {

// When a sampled coordinate's numeric derivative agrees with the analytical one:
//     |numeric - analytic| <= kGradcheckTolerance * scale + noise,
//     noise = 2 * kLossRelativeError * max(|L(x+h)|, |L(x-h)|) / (h+ + h-),
// with `scale` the largest |analytic| among the tensor's sampled coordinates and h+, h- the
// steps actually taken (x + eps rounded to float32, minus x; likewise below).
//
// Why these numbers: the central difference of a smooth loss errs by about h^2 * f''' / 6
// (truncation) plus the loss's rounding error divided by the step. The loss is a double sum of
// float32 outputs, each within a few float32 ulps (2^-24 = 6e-8 relative) of the exact value
// after the forward pass's accumulations. Measured on small conv / batch norm / tanh networks,
// a sum objective's loss (the worst of the four) moves by up to 2.4e-7 of itself (4 ulps)
// under that rounding; kLossRelativeError allows 16 ulps, and the difference of two such
// losses over the step is `noise` (1e-3 * |L| at the default h = 1e-3). The truncation at
// h = 1e-3 is 1.7e-7 * f''', negligible, and the step is small enough that a ReLU or max pool
// kink rarely falls within it (at h = 1e-2 a first-layer weight of a ReLU + max pool network
// crosses several kinks at once, which no check can tell from a wrong gradient). 1% of the
// scale then passes correct float32 networks with room for a larger --eps (f''' up to ~60
// times the gradient at h = 1e-2), and still fails a gradient a few percent off at the larger
// sampled coordinates (one 5% off fails once 4% of the scale exceeds `noise`).
//
// A loss that is a small difference of large terms (a sum over many outputs of both signs)
// carries more rounding than 16 ulps of itself; gradcheck then reports mismatches that a
// larger --eps makes go away.
constexpr double kGradcheckTolerance = 1e-2;
constexpr double kLossRelativeError = 1e-6;

// The name of the input in the table.
constexpr char kInputName[] = "input";

// One sampled coordinate's evaluation.
struct Probe {
  int64_t index = 0;
  double analytic = 0;
  double numeric = 0;  // the central difference
  double error = 0;    // |numeric - analytic|
  double bound = 0;    // what error must not exceed
  // The one-sided differences disagree enough to explain the error: the loss has a kink
  // (ReLU at 0, a max pool's argmax changing, ...) within the step.
  bool kink = false;
};

struct TensorCheck {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<Probe> probes;
  int kinks = 0;
  int failures = 0;
  // The probe with the largest error / bound, or -1 if none.
  int worst = -1;
  double max_error = 0;
  double max_relative_error = 0;
};

// Evaluates the loss of `request` as its tensors are now, through the server.
class LossEvaluator {
 public:
  LossEvaluator(gradclient::Client& client, gradengine::GradientRequest request)
      : client_(client), request_(std::move(request)) {
    request_.gradients.input = false;
    request_.gradients.all_parameters = false;
    request_.gradients.parameters.clear();
    // The output is needed only to form grad_output's loss.
    call_.skip_output = request_.objective.kind != gradengine::ObjectiveKind::kGradOutput;
  }

  absl::StatusOr<double> Loss() {
    absl::StatusOr<gradclient::GradientReply> reply = client_.ComputeGradients(request_, call_);
    if (!reply.ok()) return reply.status();
    ++calls_;
    if (request_.objective.kind != gradengine::ObjectiveKind::kGradOutput) {
      if (!reply->result.loss.has_value()) {
        return absl::InternalError("the server returned no loss for a loss objective");
      }
      return *reply->result.loss;
    }
    const gradengine::Tensor& output = reply->result.output;
    const gradengine::TensorView& grad_output = request_.objective.tensor;
    if (static_cast<int64_t>(output.data.size()) != grad_output.size) {
      return absl::InvalidArgumentError(absl::StrCat("--grad_output has ", grad_output.size,
                                                     " values but the output has ",
                                                     output.data.size()));
    }
    double loss = 0;
    for (int64_t i = 0; i < grad_output.size; ++i) {
      loss += static_cast<double>(output.data[i]) * static_cast<double>(grad_output.data[i]);
    }
    return loss;
  }

  int64_t calls() const { return calls_; }

 private:
  gradclient::Client& client_;
  gradengine::GradientRequest request_;
  gradclient::CallOptions call_;
  int64_t calls_ = 0;
};

// `samples` distinct indices in [0, count), sorted; all of them if count <= samples.
std::vector<int64_t> SampleIndices(int64_t count, int samples, std::mt19937_64& random) {
  std::vector<int64_t> indices;
  if (count <= samples) {
    for (int64_t i = 0; i < count; ++i) indices.push_back(i);
    return indices;
  }
  // Floyd's algorithm: `samples` distinct values with `samples` draws.
  std::set<int64_t> chosen;
  for (int64_t j = count - samples; j < count; ++j) {
    const int64_t t = std::uniform_int_distribution<int64_t>(0, j)(random);
    chosen.insert(chosen.count(t) == 0 ? t : j);
  }
  return std::vector<int64_t>(chosen.begin(), chosen.end());
}

// "[0,2,1,3]": the multi-index of flat `index` in `shape`.
std::string Coordinate(int64_t index, const std::vector<int64_t>& shape) {
  std::vector<int64_t> coordinate(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    coordinate[d] = index % shape[d];
    index /= shape[d];
  }
  return absl::StrCat("[", absl::StrJoin(coordinate, ","), "]");
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

// Probes `values` (a tensor of the request, which `loss` reads) at `indices`, restoring every
// value after its probes. `analytic` is the tensor's analytical gradient and `base_loss` the
// loss with nothing changed.
absl::StatusOr<TensorCheck> CheckTensor(const std::string& name, const std::vector<int64_t>& shape,
                                        float* values, const gradengine::Tensor& analytic,
                                        const std::vector<int64_t>& indices, double eps,
                                        double base_loss, LossEvaluator& loss) {
  TensorCheck check;
  check.name = name;
  check.shape = shape;
  double scale = 0;
  for (int64_t index : indices) {
    scale = std::max(scale, std::abs(static_cast<double>(analytic.data[index])));
  }
  double worst_ratio = -1;
  for (int64_t index : indices) {
    const float original = values[index];
    // The steps actually taken: x +- eps rounded to float32.
    const float plus = gradclient::Float64ToFloat32(original + eps);
    const float minus = gradclient::Float64ToFloat32(original - eps);
    const double step_plus = static_cast<double>(plus) - original;
    const double step_minus = original - static_cast<double>(minus);
    if (!(step_plus > 0) || !(step_minus > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--eps=", eps, " is below float32's resolution at ", name,
                       Coordinate(index, shape), "=", original, "; use a larger --eps"));
    }
    values[index] = plus;
    absl::StatusOr<double> loss_plus = loss.Loss();
    values[index] = minus;
    absl::StatusOr<double> loss_minus = loss.Loss();
    values[index] = original;
    if (!loss_plus.ok()) return loss_plus.status();
    if (!loss_minus.ok()) return loss_minus.status();

    Probe probe;
    probe.index = index;
    probe.analytic = analytic.data[index];
    probe.numeric = (*loss_plus - *loss_minus) / (step_plus + step_minus);
    probe.error = std::abs(probe.numeric - probe.analytic);
    const double noise = 2 * kLossRelativeError *
                         std::max(std::abs(*loss_plus), std::abs(*loss_minus)) /
                         (step_plus + step_minus);
    probe.bound = kGradcheckTolerance * scale + noise;
    if (!(probe.error <= probe.bound)) {
      // Over a smooth stretch the one-sided differences differ by about h * f'' and average to
      // the central one. Across a kink they differ by the jump in slope, and the central
      // difference, their average, is off from either side's slope (the analytical gradient)
      // by at most half of it.
      const double forward = (*loss_plus - base_loss) / step_plus;
      const double backward = (base_loss - *loss_minus) / step_minus;
      probe.kink = probe.error <= std::abs(forward - backward) / 2 + probe.bound;
    }
    if (probe.kink) {
      ++check.kinks;
    } else {
      const double magnitude = std::max(std::abs(probe.numeric), std::abs(probe.analytic));
      check.max_error = std::max(check.max_error, probe.error);
      if (magnitude > 0) {
        check.max_relative_error = std::max(check.max_relative_error, probe.error / magnitude);
      }
      if (!(probe.error <= probe.bound)) ++check.failures;
      // The worst probe is the one nearest to or furthest past its bound; NaN ranks worst.
      constexpr double kInfinity = std::numeric_limits<double>::infinity();
      double ratio =
          probe.bound > 0 ? probe.error / probe.bound : (probe.error > 0 ? kInfinity : 0);
      if (std::isnan(ratio)) ratio = kInfinity;
      if (ratio > worst_ratio || (ratio == kInfinity && worst_ratio == kInfinity)) {
        worst_ratio = ratio;
        check.worst = static_cast<int>(check.probes.size());
      }
    }
    check.probes.push_back(probe);
  }
  return check;
}

// A tensor passes unless a probe failed, or every probe hit a kink (nothing was checked).
bool Passed(const TensorCheck& check) {
  return check.failures == 0 &&
         (check.probes.empty() || check.kinks < static_cast<int>(check.probes.size()));
}

void PrintTable(const std::vector<TensorCheck>& checks) {
  int name_width = 6, shape_width = 5;
  for (const TensorCheck& check : checks) {
    name_width = std::max(name_width, static_cast<int>(check.name.size()));
    shape_width = std::max(shape_width, static_cast<int>(ShapeText(check.shape).size()));
  }
  auto print_row = [&](absl::string_view name, absl::string_view shape, absl::string_view sampled,
                       absl::string_view kinks, absl::string_view max_error,
                       absl::string_view max_relative_error, absl::string_view worst,
                       absl::string_view analytic, absl::string_view numeric,
                       absl::string_view result) {
    std::cout << absl::StrFormat("%-*s  %-*s  %7s  %5s  %11s  %11s  %-14s  %13s  %13s  %s\n",
                                 name_width, name, shape_width, shape, sampled, kinks, max_error,
                                 max_relative_error, worst, analytic, numeric, result);
  };
  print_row("tensor", "shape", "sampled", "kinks", "max_abs_err", "max_rel_err", "worst",
            "analytic", "numeric", "result");
  for (const TensorCheck& check : checks) {
    std::string worst = "-", analytic = "-", numeric = "-";
    if (check.worst >= 0) {
      const Probe& probe = check.probes[check.worst];
      worst = Coordinate(probe.index, check.shape);
      analytic = absl::StrFormat("%.6g", probe.analytic);
      numeric = absl::StrFormat("%.6g", probe.numeric);
    }
    const char* result = check.failures > 0 ? "MISMATCH" : Passed(check) ? "ok" : "UNCHECKED";
    print_row(check.name, ShapeText(check.shape), absl::StrCat(check.probes.size()),
              absl::StrCat(check.kinks), absl::StrFormat("%.3g", check.max_error),
              absl::StrFormat("%.3g", check.max_relative_error), worst, analytic, numeric, result);
  }
}

absl::Status CheckOptions(const GradcheckOptions& options) {
  const GradOptions& request = options.request;
  for (const auto& [flag, value] :
       {std::pair<const char*, const std::string*>{"--net", &request.net_path},
        {"--input", &request.input_path},
        {"--params", &request.params_dir}}) {
    if (value->empty()) return UsageError(absl::StrCat("gradctl gradcheck needs ", flag));
  }
  if (options.samples < 1) {
    return UsageError(absl::StrCat("--samples=", options.samples, " must be at least 1"));
  }
  if (!(options.eps > 0) || !std::isfinite(options.eps)) {
    return UsageError(absl::StrCat("--eps=", options.eps, " must be a positive number"));
  }
  return CheckObjectiveOptions(request, "gradcheck");
}

}  // namespace

absl::Status RunGradcheck(const GradcheckOptions& options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  GradOptions files = options.request;
  files.gradients = true;
  absl::StatusOr<RequestData> data = ReadRequestData(files);
  if (!data.ok()) return data.status();
  absl::StatusOr<std::unique_ptr<gradclient::Client>> client = Connect(files.connection);
  if (!client.ok()) return client.status();

  // The tensors checked, in the server's order: the input, then each trainable parameter.
  struct Checked {
    std::string name;
    gradengine::Tensor* tensor;
  };
  std::vector<Checked> checked = {{kInputName, &data->input}};
  gradengine::GradientRequest request;
  request.network = data->network;
  request.gradients.input = true;
  request.gradients.all_parameters = false;
  for (const gradengine::LayerSpec& layer : data->network.layers) {
    for (const gradengine::ParameterInfo& parameter : gradengine::LayerParameters(layer)) {
      if (!parameter.trainable) continue;
      auto found = data->parameters.find(parameter.name);
      if (found == data->parameters.end()) continue;  // the server names what is missing
      request.gradients.parameters.push_back(parameter.name);
      checked.push_back({parameter.name, &found->second});
    }
  }
  for (const auto& [name, tensor] : data->parameters) request.parameters[name] = tensor.view();
  request.input = data->input.view();
  request.objective = MakeObjective(files, *data);

  gradclient::CallOptions call;
  call.skip_output = true;
  absl::StatusOr<gradclient::GradientReply> reply = (*client)->ComputeGradients(request, call);
  if (!reply.ok()) return reply.status();
  const gradengine::GradientResult& gradients = reply->result;

  LossEvaluator loss(**client, request);
  absl::StatusOr<double> base_loss = loss.Loss();
  if (!base_loss.ok()) return base_loss.status();
  std::cout << absl::StrFormat(
      "gradcheck: objective=%s loss=%.9g eps=%g samples=%d seed=%d; a coordinate passes when "
      "|numeric - analytic| <= %g * max|analytic| + %g * |loss| / eps\n",
      gradengine::ObjectiveName(request.objective.kind), *base_loss, options.eps, options.samples,
      options.seed, kGradcheckTolerance, kLossRelativeError);

  std::mt19937_64 random(options.seed);
  std::vector<TensorCheck> checks;
  for (const Checked& each : checked) {
    const gradengine::Tensor* analytic = nullptr;
    if (each.name == kInputName) {
      if (gradients.input_grad.has_value()) analytic = &*gradients.input_grad;
    } else if (auto found = gradients.parameter_grads.find(each.name);
               found != gradients.parameter_grads.end()) {
      analytic = &found->second;
    }
    if (analytic == nullptr || analytic->data.size() != each.tensor->data.size()) {
      return absl::InternalError(
          absl::StrCat("the server returned no gradient of ", each.name, " of its shape"));
    }
    const std::vector<int64_t> indices =
        SampleIndices(static_cast<int64_t>(each.tensor->data.size()), options.samples, random);
    absl::StatusOr<TensorCheck> check =
        CheckTensor(each.name, each.tensor->shape, each.tensor->data.data(), *analytic, indices,
                    options.eps, *base_loss, loss);
    if (!check.ok()) return check.status();
    checks.push_back(*std::move(check));
  }
  PrintTable(checks);

  std::vector<std::string> mismatched, unchecked;
  int64_t probes = 0, kinks = 0;
  for (const TensorCheck& check : checks) {
    probes += static_cast<int64_t>(check.probes.size());
    kinks += check.kinks;
    if (check.failures > 0) {
      const Probe& probe = check.probes[check.worst];
      mismatched.push_back(absl::StrFormat("%s%s analytic=%.6g numeric=%.6g (|error| %.3g > %.3g)",
                                           check.name, Coordinate(probe.index, check.shape),
                                           probe.analytic, probe.numeric, probe.error,
                                           probe.bound));
    } else if (!Passed(check)) {
      unchecked.push_back(check.name);
    }
  }
  std::cout << absl::StrFormat(
      "gradcheck: %d coordinates in %d tensors, %d calls; %d at a kink (skipped), %d tensors "
      "disagree\n",
      probes, checks.size(), loss.calls() + 1, kinks, mismatched.size());
  if (!mismatched.empty()) {
    return absl::DataLossError(
        absl::StrCat("the analytical gradients disagree with finite differences: ",
                     absl::StrJoin(mismatched, "; ")));
  }
  if (!unchecked.empty()) {
    return absl::DataLossError(absl::StrCat(
        "every sampled coordinate of ", absl::StrJoin(unchecked, ", "),
        " is at a kink, so nothing was checked; use a smaller --eps or more --samples"));
  }
  return absl::OkStatus();
}

}  // namespace gradctl
