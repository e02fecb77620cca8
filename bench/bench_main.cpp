// gmtk_bench: Google Benchmark over the gmtk calls, plus the copy and read
// rooflines and CUB baselines of selection. After the usual table it prints,
// from this run alone, PERFORMANCE.md's ratios: each benchmark's bandwidth as
// a fraction of its device's copy bandwidth, each masked call's time over the
// plain step's, global over per-tensor scope, each distribution's time over
// Gaussian data's, and for each GPU selection its time over one read of the
// gradients and its speed-up over the CUB sort that selects the same.
//
// Own flags (before Google Benchmark's):
//   --gmtk_ratios_out=FILE   also write the ratios as JSON
//   --gmtk_layers=N          Llama-2-7B layers in the GPU parameter list (default 2)
//   --gmtk_cpu_large         add the 1e8-entry CPU reference benchmarks
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "step_benchmarks.hpp"

namespace gmtk_bench {
namespace {

// Google Benchmark 1.7 calls a skipped run error_occurred; 1.8 calls it skipped.
template <typename Run>
auto run_was_skipped(const Run& run, int) -> decltype(run.error_occurred, bool()) {
  return run.error_occurred;
}
template <typename Run>
bool run_was_skipped(const Run& run, long) {
  return static_cast<bool>(run.skipped);
}

struct Measurement {
  double seconds_per_iteration = 0;
  double bytes_per_second = 0;
};

// The console reporter, keeping each finished run's time and bandwidth.
class RecordingReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration || run_was_skipped(run, 0) || run.iterations == 0) continue;
      Measurement m;
      m.seconds_per_iteration = run.real_accumulated_time / static_cast<double>(run.iterations);
      const auto bandwidth = run.counters.find("bytes_per_second");
      if (bandwidth != run.counters.end()) m.bytes_per_second = bandwidth->second.value;
      // The registered name, without the "/real_time" or "/manual_time" suffix.
      const std::string& args = run.run_name.args;
      measurements[run.run_name.function_name + (args.empty() ? "" : "/" + args)] = m;
    }
    ConsoleReporter::ReportRuns(runs);
  }
  std::map<std::string, Measurement> measurements;
};

struct Ratio {
  std::string benchmark;
  std::string what;
  double value;
};

// Pairs every registered gmtk run with the runs it is measured against (only
// pairs that both completed in this run give a ratio).
std::vector<Ratio> ratios_of(const std::map<std::string, Measurement>& measured) {
  std::vector<Ratio> ratios;
  auto find = [&](const std::string& name) -> const Measurement* {
    const auto it = measured.find(name);
    return it == measured.end() ? nullptr : &it->second;
  };
  auto add_time_ratio = [&](const std::string& name, const Measurement& m, const std::string& base_name,
                            const std::string& what) {
    if (const Measurement* base = find(base_name)) {
      ratios.push_back({name, what, m.seconds_per_iteration / base->seconds_per_iteration});
    }
  };
  // A read of `bytes` at the read roofline: the same-size read when it ran,
  // else the fastest read measured (its bandwidth is the roofline).
  auto one_read_of = [&](double bytes) -> const Measurement* {
    if (const Measurement* same_size = find(read_roofline_name(std::llround(bytes)))) return same_size;
    const Measurement* fastest = nullptr;
    for (const auto& [name, m] : measured) {
      if (is_read_roofline(name) && (fastest == nullptr || m.bytes_per_second > fastest->bytes_per_second)) {
        fastest = &m;
      }
    }
    return fastest;
  };
  for (const auto& [name, m] : measured) {
    const auto found = registered_specs().find(name);
    if (found == registered_specs().end()) continue;
    const StepSpec& spec = found->second;
    if (const Measurement* copy = find(copy_benchmark_name(spec.device))) {
      if (copy->bytes_per_second > 0 && m.bytes_per_second > 0) {
        ratios.push_back({name, "floor bytes/s over copy bytes/s", m.bytes_per_second / copy->bytes_per_second});
      }
    }
    const std::string plain = spec.plain().name();
    if (plain != name) add_time_ratio(name, m, plain, "time over plain step (ratio 0)");
    if (spec.scope == GMTK_SCOPE_GLOBAL) add_time_ratio(name, m, spec.per_tensor().name(), "time over per-tensor scope");
    if (spec.distribution != Distribution::gaussian) {
      StepSpec gaussian = spec;
      gaussian.distribution = Distribution::gaussian;
      add_time_ratio(name, m, gaussian.name(), "time over gaussian");
    }
    if (spec.call == Call::select && spec.device == "gpu") {
      // Selection time over one read of the same bytes, taken as bandwidths
      // (read bytes/s over selection floor bytes/s) so that a read of another
      // size serves when none of the same size ran.
      const Measurement* read = one_read_of(spec.floor_bytes());
      if (read != nullptr && m.bytes_per_second > 0) {
        ratios.push_back({name, "time over one read of gradients", read->bytes_per_second / m.bytes_per_second});
      }
      const SortBaselineSpec baseline = SortBaselineSpec::for_selection(spec);
      if (const Measurement* sort = find(baseline.name())) {
        ratios.push_back({name, std::string("speed-up over CUB ") + baseline.method_name(),
                          sort->seconds_per_iteration / m.seconds_per_iteration});
      }
    }
  }
  return ratios;
}

void print_ratios(const std::vector<Ratio>& ratios) {
  std::printf("\nRatios measured in this run (PERFORMANCE.md):\n");
  if (ratios.empty()) std::printf("  (none: no benchmark pair completed)\n");
  for (const Ratio& r : ratios) std::printf("  %-36s %7.3f  %s\n", r.what.c_str(), r.value, r.benchmark.c_str());
}

bool write_ratios_json(const std::string& path, const std::vector<Ratio>& ratios,
                       const std::map<std::string, Measurement>& measured, const std::string& gpu_status) {
  std::ofstream out(path);
  out << "{\n  \"gpu\": \"" << gpu_status << "\",\n  \"measurements\": [\n";
  size_t i = 0;
  for (const auto& [name, m] : measured) {
    out << "    {\"benchmark\": \"" << name << "\", \"seconds_per_iteration\": " << m.seconds_per_iteration
        << ", \"bytes_per_second\": " << m.bytes_per_second << "}" << (++i < measured.size() ? "," : "") << "\n";
  }
  out << "  ],\n  \"ratios\": [\n";
  for (size_t r = 0; r < ratios.size(); ++r) {
    out << "    {\"benchmark\": \"" << ratios[r].benchmark << "\", \"ratio\": \"" << ratios[r].what
        << "\", \"value\": " << ratios[r].value << "}" << (r + 1 < ratios.size() ? "," : "") << "\n";
  }
  out << "  ]\n}\n";
  return static_cast<bool>(out);
}

}  // namespace
}  // namespace gmtk_bench

int main(int argc, char** argv) {
  std::string ratios_out;
  int layers = 2;
  bool cpu_large = false;
  std::vector<char*> passed_on;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--gmtk_ratios_out=", 18) == 0) {
      ratios_out = argv[i] + 18;
    } else if (std::strncmp(argv[i], "--gmtk_layers=", 14) == 0) {
      layers = std::atoi(argv[i] + 14);
    } else if (std::strcmp(argv[i], "--gmtk_cpu_large") == 0) {
      cpu_large = true;
    } else {
      passed_on.push_back(argv[i]);
    }
  }
  int passed_on_count = static_cast<int>(passed_on.size());
  benchmark::Initialize(&passed_on_count, passed_on.data());
  if (benchmark::ReportUnrecognizedArguments(passed_on_count, passed_on.data())) return 1;

  std::string gpu_status = "available";
  std::string reason;
  if (!gmtk_bench::register_gpu_benchmarks(layers, &reason)) {
    gpu_status = "unavailable: " + reason;
    std::fprintf(stderr, "gmtk_bench: GPU benchmarks not registered (%s); CPU reference benchmarks only\n",
                 reason.c_str());
  }
  gmtk_bench::register_cpu_benchmarks(cpu_large);

  gmtk_bench::RecordingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const auto ratios = gmtk_bench::ratios_of(reporter.measurements);
  gmtk_bench::print_ratios(ratios);
  if (!ratios_out.empty() && !gmtk_bench::write_ratios_json(ratios_out, ratios, reporter.measurements, gpu_status)) {
    std::fprintf(stderr, "gmtk_bench: could not write %s\n", ratios_out.c_str());
    return 1;
  }
  benchmark::Shutdown();
  return 0;
}
