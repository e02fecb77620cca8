// gmtk_bench: Google Benchmark over the gmtk calls, plus the copy rooflines.
// After the usual table it prints, from this run alone, each benchmark's
// bandwidth as a fraction of its device's copy bandwidth and each masked
// step's time over the plain step's (PERFORMANCE.md's ratios).
//
// Own flags (before Google Benchmark's):
//   --gmtk_ratios_out=FILE   also write the ratios as JSON
//   --gmtk_layers=N          Llama-2-7B layers in the GPU parameter list (default 2)
//   --gmtk_cpu_large         add the 1e8-entry CPU reference benchmarks
#include <benchmark/benchmark.h>

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

std::vector<Ratio> ratios_of(const std::map<std::string, Measurement>& measured) {
  std::vector<Ratio> ratios;
  auto find = [&](const std::string& name) -> const Measurement* {
    const auto it = measured.find(name);
    return it == measured.end() ? nullptr : &it->second;
  };
  for (const auto& [name, m] : measured) {
    const auto spec = registered_specs().find(name);
    if (spec == registered_specs().end()) continue;
    if (const Measurement* copy = find(copy_benchmark_name(spec->second.device))) {
      if (copy->bytes_per_second > 0 && m.bytes_per_second > 0) {
        ratios.push_back({name, "floor bytes/s over copy bytes/s", m.bytes_per_second / copy->bytes_per_second});
      }
    }
    const std::string plain = spec->second.plain().name();
    if (plain != name) {
      if (const Measurement* base = find(plain)) {
        ratios.push_back({name, "time over plain step (ratio 0)", m.seconds_per_iteration / base->seconds_per_iteration});
      }
    }
    if (spec->second.scope == GMTK_SCOPE_GLOBAL) {
      if (const Measurement* base = find(spec->second.per_tensor().name())) {
        ratios.push_back({name, "time over per-tensor scope", m.seconds_per_iteration / base->seconds_per_iteration});
      }
    }
  }
  return ratios;
}

void print_ratios(const std::vector<Ratio>& ratios) {
  std::printf("\nRatios measured in this run (PERFORMANCE.md):\n");
  if (ratios.empty()) std::printf("  (none: no benchmark pair completed)\n");
  for (const Ratio& r : ratios) std::printf("  %-34s %7.3f  %s\n", r.what.c_str(), r.value, r.benchmark.c_str());
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
