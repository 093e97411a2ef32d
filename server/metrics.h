// A registry of metrics, rendered in Prometheus' text exposition format (version 0.0.4). It
// knows nothing of gRPC or HTTP: the server records into it and an HTTP listener
// (server/metrics_http.h) serves Render().
//
// A family is one metric name with its help text, its type and its label names; its series are
// told apart by their label values. Three kinds:
//   - counters the process increments (Counter, found with CounterFamily::WithLabels);
//   - histograms with fixed bucket bounds (Histogram, HistogramFamily::WithLabels), rendered as
//     cumulative <name>_bucket{le="..."} series ending in le="+Inf", then <name>_sum and
//     <name>_count;
//   - gauges, and counters kept elsewhere (say, in the engine), whose value a callback returns
//     when the registry is rendered (AddGauge, AddCounterCallback).
// Families render in the order they were added, each with one # HELP and one # TYPE line;
// series within a family in the order of their label values.
//
// Names are the caller's responsibility: every name passed here is a constant of the program.
// A metric name that is not [a-zA-Z_:][a-zA-Z0-9_:]*, a label name that is not
// [a-zA-Z_][a-zA-Z0-9_]* (or starts with "__", or is "le" on a histogram), a family added twice
// under one name with a different type, help or label names, or label values that do not match
// the family's label names abort the process with a message naming the metric: they are
// programming errors, found by the first test that builds the registry.
//
// Thread safety: every method may be called from any thread at once. Recording is cheap:
// Counter::Increment is one relaxed atomic add, Histogram::Observe two atomic adds and a
// compare-and-swap loop for the sum; WithLabels takes a reader lock to find an existing series
// (keep the pointer it returns to skip even that; it stays valid as long as the registry).
// Render() calls the callbacks on the rendering thread; they must be thread-safe and must not
// call into the registry. A scrape may see a histogram's _sum one observation behind its
// buckets; its _count always equals its +Inf bucket.

#ifndef SERVER_METRICS_H_
#define SERVER_METRICS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace gradserver {

// Label names and values of one series, in the family's label order.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

// Upper bounds, in seconds, of the buckets of request latency histograms: 100 µs to 60 s in
// 1-2.5-5 steps (then 30 s and 60 s), 18 buckets plus +Inf.
std::vector<double> LatencyBucketsSeconds();

class Counter {
 public:
  Counter() = default;
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;

  // REQUIRES: by >= 0 (a counter only goes up).
  void Increment(int64_t by = 1) { value_.fetch_add(by, std::memory_order_relaxed); }
  int64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> value_{0};
};

class Histogram {
 public:
  // `bounds`: the buckets' upper bounds, strictly increasing and finite.
  explicit Histogram(std::shared_ptr<const std::vector<double>> bounds);
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  // Counts `value` in the first bucket whose bound is >= value (the +Inf bucket past the last).
  // NaN counts in +Inf and makes the sum NaN, as in Prometheus' own clients.
  void Observe(double value);

  struct Snapshot {
    std::vector<int64_t> cumulative_counts;  // per bound, then +Inf (== count)
    double sum = 0;
    int64_t count = 0;
  };
  Snapshot Read() const;

  const std::vector<double>& bounds() const { return *bounds_; }

 private:
  const std::shared_ptr<const std::vector<double>> bounds_;
  // Per bucket, not cumulative: bounds_->size() + 1 of them, the last one +Inf.
  const std::unique_ptr<std::atomic<int64_t>[]> counts_;
  std::atomic<double> sum_{0};
};

// Orders label values so that a series can be found with string_views, without allocating.
struct LabelValuesLess {
  using is_transparent = void;
  template <typename A, typename B>
  bool operator()(const A& a, const B& b) const {
    return std::lexicographical_compare(
        a.begin(), a.end(), b.begin(), b.end(),
        [](absl::string_view x, absl::string_view y) { return x < y; });
  }
};

class MetricFamily {
 public:
  virtual ~MetricFamily() = default;
  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const char* type() const { return type_; }
  const std::vector<std::string>& label_names() const { return label_names_; }

  // Appends the family's # HELP and # TYPE lines and its samples to `out`.
  void Render(std::string* out) const;

  // Whether `other`, of the same class, describes the same family (type, help, label names,
  // and for histograms the bounds).
  virtual bool SameAs(const MetricFamily& other) const;

 protected:
  MetricFamily(std::string name, std::string help, const char* type,
               std::vector<std::string> label_names);
  // Aborts unless `values` has one value per label name.
  void CheckLabelCount(size_t values) const;
  // Appends the samples.
  virtual void RenderSamples(std::string* out) const = 0;

 private:
  const std::string name_;
  const std::string help_;
  const char* const type_;
  const std::vector<std::string> label_names_;
};

// The series of a counter or histogram family, created on first use.
template <typename Series>
class SeriesFamily : public MetricFamily {
 public:
  // The series with these label values (one per label name, in order), created at 0 the first
  // time. The pointer stays valid as long as the registry.
  Series* WithLabels(absl::Span<const absl::string_view> values) ABSL_LOCKS_EXCLUDED(mu_);

 protected:
  using MetricFamily::MetricFamily;
  virtual std::unique_ptr<Series> NewSeries() const = 0;

  mutable absl::Mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<Series>, LabelValuesLess> series_
      ABSL_GUARDED_BY(mu_);
};

class CounterFamily final : public SeriesFamily<Counter> {
 public:
  CounterFamily(std::string name, std::string help, std::vector<std::string> label_names);

 private:
  std::unique_ptr<Counter> NewSeries() const override;
  void RenderSamples(std::string* out) const override;
};

class HistogramFamily final : public SeriesFamily<Histogram> {
 public:
  HistogramFamily(std::string name, std::string help, std::vector<std::string> label_names,
                  std::vector<double> bounds);

  bool SameAs(const MetricFamily& other) const override;

 private:
  std::unique_ptr<Histogram> NewSeries() const override;
  void RenderSamples(std::string* out) const override;

  const std::shared_ptr<const std::vector<double>> bounds_;
};

class Metrics {
 public:
  Metrics() = default;
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // A counter family with these label names (none: one unlabelled series, WithLabels({})).
  // Adding the same family again (same help and label names) returns the one already there.
  CounterFamily* AddCounterFamily(absl::string_view name, absl::string_view help,
                                  std::vector<std::string> label_names);
  // A histogram family; `bounds` as for Histogram.
  HistogramFamily* AddHistogramFamily(absl::string_view name, absl::string_view help,
                                      std::vector<std::string> label_names,
                                      std::vector<double> bounds);

  // A gauge series whose value `read` returns at each Render(). Several calls with one name and
  // the same help and label names add series to one family; each label set at most once.
  void AddGauge(absl::string_view name, absl::string_view help, std::function<double()> read);
  void AddGauge(absl::string_view name, absl::string_view help, const MetricLabels& labels,
                std::function<double()> read);
  // The same for a counter kept elsewhere: `read` must never go down (while the process lives).
  void AddCounterCallback(absl::string_view name, absl::string_view help,
                          std::function<double()> read);

  // Every family in the text exposition format, "\n" after every line.
  std::string Render() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  class CallbackFamily;
  template <typename Family, typename... Args>
  Family* AddFamily(absl::string_view name, absl::string_view help,
                    std::vector<std::string> label_names, Args&&... args) ABSL_LOCKS_EXCLUDED(mu_);
  void AddCallback(absl::string_view name, absl::string_view help, const char* type,
                   const MetricLabels& labels, std::function<double()> read);

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<MetricFamily>> families_ ABSL_GUARDED_BY(mu_);
};

}  // namespace gradserver

#endif  // SERVER_METRICS_H_
