#include "client/gradctl/cli_util.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/gradctl/network_json.h"

namespace gradctl {
namespace {

// Marks a status as a usage error; the payload's value is not used.
constexpr char kUsageErrorPayload[] = "type.gradctl/usage_error";

// The first line of `path` that is neither blank nor a # comment, trimmed. Never shows the line.
absl::StatusOr<std::string> ReadFirstToken(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth_token_file=", path, " cannot be read: ", std::strerror(errno)));
  }
  std::string line;
  while (std::getline(file, line)) {
    const absl::string_view token = absl::StripAsciiWhitespace(line);
    if (!token.empty() && token[0] != '#') return std::string(token);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--auth_token_file=", path,
                   " holds no token (blank lines and lines starting with # are skipped)"));
}

// "float64 ('<f8')", "big-endian float32 ('>f4')": a .npy descr the readers convert from, for
// the note on stderr.
std::string DescribeDtype(const std::string& descr) {
  if (descr.size() != 3) return absl::StrCat("'", descr, "'");
  const int bits = 8 * (descr[2] - '0');
  return absl::StrCat(descr[0] == '>' ? "big-endian " : "", descr[1] == 'f' ? "float" : "int", bits,
                      " ('", descr, "')");
}

void NoteConversion(const std::string& path, const std::string& converted_from,
                    absl::string_view to) {
  if (converted_from.empty()) return;
  std::cerr << "gradctl: note: " << path << " is " << DescribeDtype(converted_from)
            << "; converted to " << to << "\n";
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    const std::error_code error(errno, std::generic_category());
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat(path, ": cannot open: ", error.message()));
  }
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad()) return absl::DataLossError(absl::StrCat(path, ": cannot read"));
  return text.str();
}

}  // namespace

absl::StatusOr<gradengine::Tensor> ReadFloatNpy(const std::string& path) {
  absl::StatusOr<gradclient::NpyArray> array = gradclient::ReadNpyFile(path);
  if (!array.ok()) return array.status();
  NoteConversion(path, array->converted_from, "float32");
  return gradengine::Tensor(std::move(array->shape), std::move(array->data));
}

absl::StatusOr<gradclient::NpyInt64Array> ReadLabelsNpy(const std::string& path) {
  absl::StatusOr<gradclient::NpyInt64Array> labels = gradclient::ReadNpyInt64File(path);
  if (!labels.ok()) return labels.status();
  NoteConversion(path, labels->converted_from, "int64");
  return labels;
}

absl::StatusOr<gradengine::NetworkSpec> ReadNetworkFile(const std::string& path) {
  absl::StatusOr<std::string> json = ReadTextFile(path);
  if (!json.ok()) return json.status();
  return ParseNetworkJson(*json, path);
}

absl::Status ReadParameters(const gradengine::NetworkSpec& network, const std::string& params_dir,
                            std::map<std::string, gradengine::Tensor>* parameters) {
  for (const gradengine::LayerSpec& layer : network.layers) {
    for (const gradengine::ParameterInfo& parameter : gradengine::LayerParameters(layer)) {
      const std::string path =
          (std::filesystem::path(params_dir) / (parameter.name + ".npy")).string();
      if (!parameter.required) {
        std::error_code error;
        if (!std::filesystem::exists(path, error)) continue;
      }
      absl::StatusOr<gradengine::Tensor> tensor = ReadFloatNpy(path);
      if (!tensor.ok()) return tensor.status();
      (*parameters)[parameter.name] = *std::move(tensor);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<StagedRequest> StageInSharedMemory(gradclient::Client& client,
                                                  gradengine::GradientRequest* request,
                                                  int result_copies) {
  constexpr int64_t kAlign = gradclient::SharedMemoryRegion::kAlignment;
  auto aligned = [](int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; };
  auto tensor_bytes = [](absl::Span<const int64_t> shape) {
    int64_t bytes = sizeof(float);
    for (int64_t d : shape) bytes *= d;
    return bytes;
  };
  // Room for the inputs (the region adds its header itself).
  StagedRequest staged;
  staged.inputs_bytes = aligned(request->input.size * 4);
  for (const auto& [name, view] : request->parameters) {
    staged.inputs_bytes += aligned(view.size * 4);
  }
  staged.inputs_bytes += aligned(request->objective.tensor.size * 4);
  // Room for every result the request could ask for; the server checks the network itself.
  absl::StatusOr<gradengine::ValidatedNetwork> shapes = gradengine::ValidateNetwork(
      request->network, request->input.shape, std::numeric_limits<int64_t>::max());
  if (!shapes.ok()) return shapes.status();
  staged.results_bytes = aligned(tensor_bytes(shapes->output_shapes.back())) +
                         aligned(tensor_bytes(request->input.shape));
  for (const gradengine::ParameterInfo& parameter : shapes->parameters) {
    // Buffers have no gradient; running statistics come back as bytes.
    if (parameter.trainable) staged.results_bytes += aligned(tensor_bytes(parameter.shape));
  }
  absl::StatusOr<std::shared_ptr<gradclient::SharedMemoryRegion>> region =
      gradclient::SharedMemoryRegion::Create(
          absl::StrCat("gradctl-", getpid()),
          static_cast<size_t>(staged.inputs_bytes + result_copies * staged.results_bytes));
  if (!region.ok()) return region.status();
  if (absl::Status s = gradclient::CopyRequestInto(**region, request); !s.ok()) return s;
  // The results go after the inputs (and the region's header).
  staged.inputs_bytes = static_cast<int64_t>((*region)->allocated_bytes());
  if (absl::Status s = client.RegisterSharedMemory(*region); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("--shared_memory: ", s.message()));
  }
  staged.region = *std::move(region);
  return staged;
}

absl::Status UsageError(absl::string_view message) {
  absl::Status status = absl::InvalidArgumentError(message);
  status.SetPayload(kUsageErrorPayload, absl::Cord("1"));
  return status;
}

bool IsUsageError(const absl::Status& status) {
  return status.GetPayload(kUsageErrorPayload).has_value();
}

absl::StatusOr<std::unique_ptr<gradclient::Client>> Connect(const ConnectionOptions& options) {
  if (options.timeout <= absl::ZeroDuration()) {
    return UsageError(
        absl::StrCat("--timeout=", absl::FormatDuration(options.timeout), " must be positive"));
  }
  if (options.server.empty()) return UsageError("--server is empty; expected HOST:PORT");
  gradclient::ClientOptions client_options;
  client_options.default_timeout = options.timeout;
  client_options.tls.enabled = options.tls || !options.tls_ca.empty() ||
                               !options.tls_cert.empty() || !options.tls_key.empty() ||
                               !options.tls_server_name.empty();
  client_options.tls.root_ca_file = options.tls_ca;
  client_options.tls.cert_file = options.tls_cert;
  client_options.tls.key_file = options.tls_key;
  client_options.tls.server_name_override = options.tls_server_name;
  client_options.auth_token = options.auth_token;
  if (!options.auth_token_file.empty()) {
    absl::StatusOr<std::string> token = ReadFirstToken(options.auth_token_file);
    if (!token.ok()) return token.status();
    client_options.auth_token = *std::move(token);
  }
  return gradclient::Client::Create(options.server, client_options);
}

std::string JsonString(absl::string_view text) {
  std::string out = "\"";
  for (char c : text) {
    const unsigned char byte = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (byte < 0x20) {
          absl::StrAppendFormat(&out, "\\u%04x", byte);
        } else {
          out.push_back(c);
        }
    }
  }
  out += "\"";
  return out;
}

std::string JsonNumber(double value) {
  if (std::isnan(value)) return "\"NaN\"";
  if (std::isinf(value)) return value > 0 ? "\"Infinity\"" : "\"-Infinity\"";
  return absl::StrFormat("%.17g", value);
}

std::string JsonMilliseconds(absl::Duration duration) {
  return absl::StrFormat("%.3f", absl::ToDoubleMilliseconds(duration));
}

}  // namespace gradctl
