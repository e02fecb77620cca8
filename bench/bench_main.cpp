// gmtk_bench: Google Benchmark over the gmtk calls, plus the copy and read
// rooflines and CUB baselines of selection. After the usual table it prints,
// from this run alone, PERFORMANCE.md's ratios: each benchmark's bandwidth as
// a fraction of its device's copy bandwidth, each masked call's time over the
// plain step's, global over per-tensor scope, each distribution's time over
// Gaussian data's, and for each GPU selection its time over one read of the
// gradients and its speed-up over the CUB sort that selects the same; then
// the launches of one call (nodes of its CUDA graph, by type) and the median
// host time of one call. Where PERFORMANCE.md sets a target, it is printed
// beside the figure.
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
  std::map<std::string, double> counters;
};

// The console reporter, keeping each finished run's time and bandwidth.
class RecordingReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration || run_was_skipped(run, 0) || run.iterations == 0) continue;
      Measurement m;
      m.seconds_per_iteration = run.real_accumulated_time / static_cast<double>(run.iterations);
      for (const auto& [counter, value] : run.counters) m.counters[counter] = value.value;
      const auto bandwidth = m.counters.find("bytes_per_second");
      if (bandwidth != m.counters.end()) m.bytes_per_second = bandwidth->second;
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
  std::string target = "";  // PERFORMANCE.md's, where it sets one for this figure
};

// PERFORMANCE.md's targets are for the GPU, on the Llama-shaped lists (steps)
// and the 1e9-entry tensor (selection).
bool is_llama(const StepSpec& spec) { return spec.shapes.name.compare(0, 5, "llama") == 0; }
bool is_plain_adamw(const StepSpec& spec) {
  return spec.call == Call::step && spec.optimizer == GMTK_OPTIMIZER_ADAMW && spec.ratio == 0.0 &&
         spec.scope == GMTK_SCOPE_PER_TENSOR && spec.mode == GMTK_MASK_GRAD;
}
bool is_bf16_with_master(const StepSpec& spec) {
  return spec.grad_dtype == GMTK_BFLOAT16 && spec.param_dtype == GMTK_BFLOAT16 && spec.master;
}

std::string copy_target(const StepSpec& spec) {
  return spec.device == "gpu" && is_llama(spec) && is_plain_adamw(spec) ? ">= 0.90" : "";
}

std::string plain_step_target(const StepSpec& spec) {
  if (spec.device != "gpu" || !is_llama(spec) || spec.call != Call::step) return "";
  if (spec.mode == GMTK_MASK_FREEZE) return spec.ratio == 0.99 ? "<= 0.40" : "";
  if (spec.scope != GMTK_SCOPE_PER_TENSOR || spec.optimizer != GMTK_OPTIMIZER_ADAMW) return "";
  if (spec.grad_dtype == GMTK_FLOAT32 && spec.param_dtype == GMTK_FLOAT32 && !spec.master) return "<= 1.20";
  return is_bf16_with_master(spec) ? "<= 1.12" : "";
}

std::string scope_target(const StepSpec& spec) {
  return spec.device == "gpu" && is_llama(spec) && spec.call == Call::step ? "<= 1.05" : "";
}

std::string distribution_target(const StepSpec& spec) {
  return spec.device == "gpu" && spec.call == Call::select ? "<= 1.5" : "";
}

std::string one_read_target(const StepSpec& spec) {
  if (spec.shapes.total() < 1000000000 || spec.scope != GMTK_SCOPE_PER_TENSOR) return "";
  return spec.grad_dtype == GMTK_FLOAT32 ? "<= 2.2" : "<= 1.15";
}

std::string host_time_target(const StepSpec& spec) {
  if (spec.call != Call::step) return "";
  const size_t tensors = spec.shapes.numels.size();
  return tensors == 300 ? "<= 10" : tensors == 20000 ? "<= 100" : "";
}

// Pairs every registered gmtk run with the runs it is measured against (only
// pairs that both completed in this run give a ratio).
std::vector<Ratio> ratios_of(const std::map<std::string, Measurement>& measured) {
  std::vector<Ratio> ratios;
  auto find = [&](const std::string& name) -> const Measurement* {
    const auto it = measured.find(name);
    return it == measured.end() ? nullptr : &it->second;
  };
  auto add_time_ratio = [&](const std::string& name, const Measurement& m, const std::string& base_name,
                            const std::string& what, const std::string& target) {
    if (const Measurement* base = find(base_name)) {
      ratios.push_back({name, what, m.seconds_per_iteration / base->seconds_per_iteration, target});
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
        ratios.push_back(
            {name, "floor bytes/s over copy bytes/s", m.bytes_per_second / copy->bytes_per_second, copy_target(spec)});
      }
    }
    const std::string plain = spec.plain().name();
    if (plain != name) add_time_ratio(name, m, plain, "time over plain step (ratio 0)", plain_step_target(spec));
    if (spec.scope == GMTK_SCOPE_GLOBAL) {
      add_time_ratio(name, m, spec.per_tensor().name(), "time over per-tensor scope", scope_target(spec));
    }
    if (spec.distribution != Distribution::gaussian) {
      StepSpec gaussian = spec;
      gaussian.distribution = Distribution::gaussian;
      add_time_ratio(name, m, gaussian.name(), "time over gaussian",
                     spec.distribution == Distribution::student_t3 ? "" : distribution_target(spec));
    }
    if (spec.call == Call::select && spec.device == "gpu") {
      // Selection time over one read of the same bytes, taken as bandwidths
      // (read bytes/s over selection floor bytes/s) so that a read of another
      // size serves when none of the same size ran.
      const Measurement* read = one_read_of(spec.floor_bytes());
      if (read != nullptr && m.bytes_per_second > 0) {
        ratios.push_back({name, "time over one read of gradients", read->bytes_per_second / m.bytes_per_second,
                          one_read_target(spec)});
      }
      const SortBaselineSpec baseline = SortBaselineSpec::for_selection(spec);
      if (const Measurement* sort = find(baseline.name())) {
        ratios.push_back({name, std::string("speed-up over CUB ") + baseline.method_name(),
                          sort->seconds_per_iteration / m.seconds_per_iteration});
      }
    }
  }
  // Launches and host time of one call: figures of their own benchmarks'
  // counters, not ratios, listed with the ratios so the summary has them all.
  auto counter = [](const Measurement& m, const char* key) -> const double* {
    const auto it = m.counters.find(key);
    return it == m.counters.end() ? nullptr : &it->second;
  };
  for (const auto& [name, m] : measured) {
    if (registered_launch_counts().count(name) != 0) {
      const double* kernels = counter(m, "kernel_nodes");
      const double* memsets = counter(m, "memset_nodes");
      const double* others = counter(m, "other_nodes");
      const double* relaxed = counter(m, "relaxed_capture");
      if (kernels == nullptr || memsets == nullptr || others == nullptr) continue;
      const std::string mode = relaxed != nullptr && *relaxed != 0 ? " (relaxed capture)" : "";
      const std::string constant = "same at any tensor count";
      ratios.push_back({name, "launches per call: kernel nodes" + mode, *kernels, constant});
      ratios.push_back({name, "launches per call: memset nodes" + mode, *memsets, constant});
      ratios.push_back({name, "launches per call: other nodes" + mode, *others, ""});
    }
    const auto host_time = registered_host_times().find(name);
    if (host_time != registered_host_times().end()) {
      if (const double* median = counter(m, "host_us_median")) {
        ratios.push_back({name, "host us per call (median)", *median, host_time_target(host_time->second)});
      }
    }
  }
  return ratios;
}

void print_ratios(const std::vector<Ratio>& ratios) {
  std::printf("\nRatios measured in this run (PERFORMANCE.md):\n");
  if (ratios.empty()) std::printf("  (none: no benchmark pair completed)\n");
  for (const Ratio& r : ratios) {
    const std::string target = r.target.empty() ? "" : "(target " + r.target + ")";
    std::printf("  %-44s %8.3f  %-34s %s\n", r.what.c_str(), r.value, target.c_str(), r.benchmark.c_str());
  }
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
        << "\", \"value\": " << ratios[r].value << ", \"target\": \"" << ratios[r].target << "\"}"
        << (r + 1 < ratios.size() ? "," : "") << "\n";
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
