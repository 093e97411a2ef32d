#include "server/metrics.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"

namespace gradserver {
namespace {

[[noreturn]] void Die(absl::string_view metric, absl::string_view problem) {
  std::fprintf(stderr, "gradserver: metric %.*s: %.*s\n", static_cast<int>(metric.size()),
               metric.data(), static_cast<int>(problem.size()), problem.data());
  std::abort();
}

bool IsMetricName(absl::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    const bool ok =
        absl::ascii_isalpha(c) || c == '_' || c == ':' || (i > 0 && absl::ascii_isdigit(c));
    if (!ok) return false;
  }
  return true;
}

bool IsLabelName(absl::string_view name) {
  if (name.empty() || absl::StartsWith(name, "__")) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    if (!(absl::ascii_isalpha(c) || c == '_' || (i > 0 && absl::ascii_isdigit(c)))) return false;
  }
  return true;
}

// The exposition format's numbers: the shortest text that reads back as the same double, and
// Prometheus' spellings of the special values.
std::string FormatValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  // Whole numbers (counts, bytes) in full: to_chars' general format would write 4294967296 as
  // 4.294967296e+09. Up to 2^53 every whole double is exact.
  if (std::trunc(value) == value && std::fabs(value) <= 9007199254740992.0) {
    return absl::StrCat(static_cast<int64_t>(value));
  }
  char buffer[64];
  const std::to_chars_result result =
      std::to_chars(buffer, buffer + sizeof(buffer), value, std::chars_format::general);
  return std::string(buffer, result.ptr);
}

// Label values may hold anything; backslash, double quote and newline are escaped.
void AppendEscapedLabelValue(absl::string_view value, std::string* out) {
  for (char c : value) {
    switch (c) {
      case '\\':
        out->append("\\\\");
        break;
      case '"':
        out->append("\\\"");
        break;
      case '\n':
        out->append("\\n");
        break;
      default:
        out->push_back(c);
    }
  }
}

// Help text: backslash and newline are escaped (a double quote is not).
void AppendEscapedHelp(absl::string_view help, std::string* out) {
  for (char c : help) {
    if (c == '\\') {
      out->append("\\\\");
    } else if (c == '\n') {
      out->append("\\n");
    } else {
      out->push_back(c);
    }
  }
}

// `{a="x",b="y"}` for the names and values, with `extra` (say le="0.5") last; nothing at all
// when there are no labels.
void AppendLabels(const std::vector<std::string>& names, absl::Span<const std::string> values,
                  absl::string_view extra_name, absl::string_view extra_value, std::string* out) {
  if (names.empty() && extra_name.empty()) return;
  out->push_back('{');
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out->push_back(',');
    absl::StrAppend(out, names[i], "=\"");
    AppendEscapedLabelValue(values[i], out);
    out->push_back('"');
  }
  if (!extra_name.empty()) {
    if (!names.empty()) out->push_back(',');
    absl::StrAppend(out, extra_name, "=\"");
    AppendEscapedLabelValue(extra_value, out);
    out->push_back('"');
  }
  out->push_back('}');
}

void AppendSample(absl::string_view name, const std::vector<std::string>& label_names,
                  absl::Span<const std::string> label_values, absl::string_view value,
                  std::string* out) {
  out->append(name.data(), name.size());
  AppendLabels(label_names, label_values, "", "", out);
  absl::StrAppend(out, " ", value, "\n");
}

}  // namespace

std::vector<double> LatencyBucketsSeconds() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
          0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30,    60};
}

// ---------------------------------------------------------------------------------------------
// Histogram

Histogram::Histogram(std::shared_ptr<const std::vector<double>> bounds)
    : bounds_(std::move(bounds)),
      counts_(std::make_unique<std::atomic<int64_t>[]>(bounds_->size() + 1)) {}

void Histogram::Observe(double value) {
  // First bound >= value; NaN compares false everywhere and lands in +Inf.
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_->begin(), bounds_->end(), value) - bounds_->begin());
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  double sum = sum_.load(std::memory_order_relaxed);
  while (!sum_.compare_exchange_weak(sum, sum + value, std::memory_order_relaxed)) {
  }
}

Histogram::Snapshot Histogram::Read() const {
  Snapshot snapshot;
  snapshot.cumulative_counts.reserve(bounds_->size() + 1);
  int64_t running = 0;
  for (size_t i = 0; i <= bounds_->size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    snapshot.cumulative_counts.push_back(running);
  }
  snapshot.count = running;
  snapshot.sum = sum_.load(std::memory_order_relaxed);
  return snapshot;
}

// ---------------------------------------------------------------------------------------------
// Families

MetricFamily::MetricFamily(std::string name, std::string help, const char* type,
                           std::vector<std::string> label_names)
    : name_(std::move(name)),
      help_(std::move(help)),
      type_(type),
      label_names_(std::move(label_names)) {
  if (!IsMetricName(name_)) Die(name_, "not a valid metric name [a-zA-Z_:][a-zA-Z0-9_:]*");
  for (size_t i = 0; i < label_names_.size(); ++i) {
    if (!IsLabelName(label_names_[i])) {
      Die(name_, absl::StrCat("label name \"", label_names_[i],
                              "\" is not [a-zA-Z_][a-zA-Z0-9_]* without a leading __"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (label_names_[j] == label_names_[i]) {
        Die(name_, absl::StrCat("label name \"", label_names_[i], "\" is given twice"));
      }
    }
  }
}

bool MetricFamily::SameAs(const MetricFamily& other) const {
  return absl::string_view(type_) == other.type_ && help_ == other.help_ &&
         label_names_ == other.label_names_;
}

void MetricFamily::CheckLabelCount(size_t values) const {
  if (values != label_names_.size()) {
    Die(name_, absl::StrCat(values, " label values for the ", label_names_.size(), " label names (",
                            absl::StrJoin(label_names_, ","), ")"));
  }
}

void MetricFamily::Render(std::string* out) const {
  absl::StrAppend(out, "# HELP ", name_, " ");
  AppendEscapedHelp(help_, out);
  absl::StrAppend(out, "\n# TYPE ", name_, " ", type_, "\n");
  RenderSamples(out);
}

template <typename Series>
Series* SeriesFamily<Series>::WithLabels(absl::Span<const absl::string_view> values) {
  {
    absl::ReaderMutexLock lock(&mu_);
    const auto it = series_.find(values);
    if (it != series_.end()) return it->second.get();
  }
  CheckLabelCount(values.size());
  absl::MutexLock lock(&mu_);
  std::unique_ptr<Series>& series = series_[std::vector<std::string>(values.begin(), values.end())];
  if (series == nullptr) series = NewSeries();
  return series.get();
}

template class SeriesFamily<Counter>;
template class SeriesFamily<Histogram>;

CounterFamily::CounterFamily(std::string name, std::string help,
                             std::vector<std::string> label_names)
    : SeriesFamily<Counter>(std::move(name), std::move(help), "counter", std::move(label_names)) {}

std::unique_ptr<Counter> CounterFamily::NewSeries() const { return std::make_unique<Counter>(); }

void CounterFamily::RenderSamples(std::string* out) const {
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [values, counter] : series_) {
    AppendSample(name(), label_names(), values, absl::StrCat(counter->value()), out);
  }
}

HistogramFamily::HistogramFamily(std::string name, std::string help,
                                 std::vector<std::string> label_names, std::vector<double> bounds)
    : SeriesFamily<Histogram>(std::move(name), std::move(help), "histogram",
                              std::move(label_names)),
      bounds_(std::make_shared<const std::vector<double>>(std::move(bounds))) {
  for (const std::string& label : this->label_names()) {
    if (label == "le") Die(this->name(), "a histogram cannot have a label named le");
  }
  for (size_t i = 0; i < bounds_->size(); ++i) {
    if (!std::isfinite((*bounds_)[i]) || (i > 0 && (*bounds_)[i] <= (*bounds_)[i - 1])) {
      Die(this->name(), "bucket bounds must be finite and strictly increasing (+Inf is implied)");
    }
  }
}

bool HistogramFamily::SameAs(const MetricFamily& other) const {
  const auto* histogram = dynamic_cast<const HistogramFamily*>(&other);
  return MetricFamily::SameAs(other) && histogram != nullptr && *histogram->bounds_ == *bounds_;
}

std::unique_ptr<Histogram> HistogramFamily::NewSeries() const {
  return std::make_unique<Histogram>(bounds_);
}

void HistogramFamily::RenderSamples(std::string* out) const {
  const std::string bucket_name = absl::StrCat(name(), "_bucket");
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [values, histogram] : series_) {
    const Histogram::Snapshot snapshot = histogram->Read();
    for (size_t i = 0; i <= bounds_->size(); ++i) {
      out->append(bucket_name);
      AppendLabels(label_names(), values, "le",
                   i < bounds_->size() ? FormatValue((*bounds_)[i]) : "+Inf", out);
      absl::StrAppend(out, " ", snapshot.cumulative_counts[i], "\n");
    }
    AppendSample(absl::StrCat(name(), "_sum"), label_names(), values, FormatValue(snapshot.sum),
                 out);
    AppendSample(absl::StrCat(name(), "_count"), label_names(), values,
                 absl::StrCat(snapshot.count), out);
  }
}

// Gauges and counters read through callbacks.
class Metrics::CallbackFamily final : public MetricFamily {
 public:
  CallbackFamily(std::string name, std::string help, std::vector<std::string> label_names,
                 const char* type)
      : MetricFamily(std::move(name), std::move(help), type, std::move(label_names)) {}

  void Add(const MetricLabels& labels, std::function<double()> read) ABSL_LOCKS_EXCLUDED(mu_) {
    std::vector<std::string> values;
    for (size_t i = 0; i < labels.size(); ++i) {
      if (i >= label_names().size() || labels[i].first != label_names()[i]) {
        Die(name(), absl::StrCat("label names differ from the family's (",
                                 absl::StrJoin(label_names(), ","), ")"));
      }
      values.push_back(labels[i].second);
    }
    CheckLabelCount(values.size());
    absl::MutexLock lock(&mu_);
    if (!series_.emplace(std::move(values), std::move(read)).second) {
      Die(name(), "a series with these label values was added twice");
    }
  }

 private:
  void RenderSamples(std::string* out) const override ABSL_LOCKS_EXCLUDED(mu_) {
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& [values, read] : series_) {
      AppendSample(name(), label_names(), values, FormatValue(read()), out);
    }
  }

  mutable absl::Mutex mu_;
  std::map<std::vector<std::string>, std::function<double()>, LabelValuesLess> series_
      ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------------------------
// Metrics

template <typename Family, typename... Args>
Family* Metrics::AddFamily(absl::string_view name, absl::string_view help,
                           std::vector<std::string> label_names, Args&&... args) {
  // Made first, so that its names are checked even when the family exists already.
  auto candidate = std::make_unique<Family>(std::string(name), std::string(help),
                                            std::move(label_names), std::forward<Args>(args)...);
  absl::MutexLock lock(&mu_);
  for (const std::unique_ptr<MetricFamily>& family : families_) {
    if (family->name() != name) continue;
    auto* same = dynamic_cast<Family*>(family.get());
    if (same == nullptr || !same->SameAs(*candidate)) {
      Die(name, "added twice, with a different kind, type, help, label names or buckets");
    }
    return same;
  }
  families_.push_back(std::move(candidate));
  return static_cast<Family*>(families_.back().get());
}

CounterFamily* Metrics::AddCounterFamily(absl::string_view name, absl::string_view help,
                                         std::vector<std::string> label_names) {
  return AddFamily<CounterFamily>(name, help, std::move(label_names));
}

HistogramFamily* Metrics::AddHistogramFamily(absl::string_view name, absl::string_view help,
                                             std::vector<std::string> label_names,
                                             std::vector<double> bounds) {
  return AddFamily<HistogramFamily>(name, help, std::move(label_names), std::move(bounds));
}

void Metrics::AddCallback(absl::string_view name, absl::string_view help, const char* type,
                          const MetricLabels& labels, std::function<double()> read) {
  std::vector<std::string> label_names;
  for (const auto& [label, value] : labels) label_names.push_back(label);
  AddFamily<CallbackFamily>(name, help, std::move(label_names), type)->Add(labels, std::move(read));
}

void Metrics::AddGauge(absl::string_view name, absl::string_view help,
                       std::function<double()> read) {
  AddCallback(name, help, "gauge", {}, std::move(read));
}

void Metrics::AddGauge(absl::string_view name, absl::string_view help, const MetricLabels& labels,
                       std::function<double()> read) {
  AddCallback(name, help, "gauge", labels, std::move(read));
}

void Metrics::AddCounterCallback(absl::string_view name, absl::string_view help,
                                 std::function<double()> read) {
  AddCallback(name, help, "counter", {}, std::move(read));
}

std::string Metrics::Render() const {
  std::string out;
  absl::ReaderMutexLock lock(&mu_);
  for (const std::unique_ptr<MetricFamily>& family : families_) family->Render(&out);
  return out;
}

}  // namespace gradserver
