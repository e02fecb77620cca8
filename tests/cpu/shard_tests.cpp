// SPEC sections 1 and 9: sharded tensors on the CPU reference backend.
//
// Each rank is a std::thread with its own handle and its own plan bound to
// comms[rank] (gmtkCommCreateInProcess). Record i of every rank's plan is the
// rank's slice [shard_offset, shard_offset + numel) of logical tensor i; a
// record with logical_numel == 0 and shard_offset == 0 is a whole tensor (a
// replica: the same gradient on every rank). The oracle is one unsharded plan
// (no communicator) over the whole tensors on the same backend: every rank must
// get bitwise its thresholds, kept counts (of the logical tensor) and found_inf,
// and the concatenation of the ranks' slices must equal its tensors bit for bit.
//
// Catch2 is not thread-safe: rank threads record what they saw (statuses,
// thread-local error messages, outputs, snapshots of their buffers) and the
// main thread checks it after they have all returned. Every multi-rank section
// runs under a watchdog, so that a deadlock fails the test instead of hanging.
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#include "test_support.hpp"

using namespace gmtk_test;

namespace {

constexpr std::chrono::seconds kWatchdog{15};

// ---- Threads, one per rank, under a watchdog --------------------------------

// Runs body(rank) on num_ranks threads. Returns "" when all returned within the
// timeout, else what went wrong. On a timeout (a deadlock) the threads are
// detached and keep alive what the body captured: bodies capture shared_ptrs
// only, never references to the test's stack.
std::string run_ranks(int num_ranks, std::function<void(int)> body, std::chrono::seconds timeout = kWatchdog) {
  struct Shared {
    std::mutex mutex;
    std::condition_variable cv;
    int done = 0;
    std::vector<std::string> errors;
    std::function<void(int)> body;
  };
  auto shared = std::make_shared<Shared>();
  shared->body = std::move(body);
  std::vector<std::thread> threads;
  for (int r = 0; r < num_ranks; ++r) {
    threads.emplace_back([shared, r] {
      std::string error;
      try {
        shared->body(r);
      } catch (const std::exception& e) {
        error = "rank " + std::to_string(r) + " threw: " + e.what();
      } catch (...) {
        error = "rank " + std::to_string(r) + " threw";
      }
      std::lock_guard<std::mutex> lock(shared->mutex);
      if (!error.empty()) shared->errors.push_back(error);
      ++shared->done;
      shared->cv.notify_all();
    });
  }
  bool finished = false;
  int done = 0;
  {
    std::unique_lock<std::mutex> lock(shared->mutex);
    finished = shared->cv.wait_for(lock, timeout, [&] { return shared->done == num_ranks; });
    done = shared->done;
  }
  for (std::thread& t : threads) {
    if (finished) {
      t.join();
    } else {
      t.detach();
    }
  }
  if (!finished) {
    return "watchdog: only " + std::to_string(done) + " of " + std::to_string(num_ranks) + " ranks returned within " +
           std::to_string(timeout.count()) + " s (deadlock?)";
  }
  std::string errors;
  for (const std::string& e : shared->errors) errors += e + "\n";
  return errors;
}

#define REQUIRE_RANKS_RETURN(expr) \
  do {                             \
    const std::string ranks_error_ = (expr); \
    INFO(ranks_error_);            \
    REQUIRE(ranks_error_.empty()); \
  } while (0)

// num_ranks linked in-process communicators, destroyed with the object.
struct Comms {
  std::vector<gmtkComm_t> comms;
  gmtkStatus_t status = GMTK_ERROR_INTERNAL;
  explicit Comms(int num_ranks) : comms(static_cast<size_t>(num_ranks), nullptr) {
    status = gmtkCommCreateInProcess(num_ranks, comms.data());
  }
  ~Comms() {
    for (gmtkComm_t c : comms) gmtkCommDestroy(c);
  }
  Comms(const Comms&) = delete;
  Comms& operator=(const Comms&) = delete;
};

std::shared_ptr<Comms> make_comms(int num_ranks) {
  auto comms = std::make_shared<Comms>(num_ranks);
  INFO("gmtkCommCreateInProcess(" << num_ranks << ") -> " << gmtkGetErrorString(comms->status) << ": "
                                  << gmtkGetLastErrorMessage());
  REQUIRE(comms->status == GMTK_SUCCESS);
  return comms;
}

std::string status_text(gmtkStatus_t status, const std::string& message) {
  return std::string(gmtkGetErrorString(status)) + (message.empty() ? "" : ": " + message);
}

// ---- Layouts: contiguous dim-0-like chunks --------------------------------

struct Slice {
  int64_t offset = 0;
  int64_t count = 0;
};

// cuts[0] = 0 <= cuts[1] <= ... <= cuts[R] = n; rank r holds [cuts[r], cuts[r + 1]).
std::vector<Slice> from_cuts(const std::vector<int64_t>& cuts) {
  std::vector<Slice> slices;
  for (size_t r = 0; r + 1 < cuts.size(); ++r) slices.push_back({cuts[r], cuts[r + 1] - cuts[r]});
  return slices;
}

// Uneven random cuts; with pinned cuts (index -> value) forced first.
std::vector<Slice> random_layout(int64_t n, int num_ranks, std::mt19937_64& rng,
                                 const std::vector<std::pair<int, int64_t>>& pinned = {}) {
  std::uniform_int_distribution<int64_t> cut(0, n);
  std::vector<int64_t> cuts(static_cast<size_t>(num_ranks) + 1);
  for (auto& c : cuts) c = cut(rng);
  cuts.front() = 0;
  cuts.back() = n;
  for (const auto& p : pinned) cuts[static_cast<size_t>(p.first)] = p.second;
  std::sort(cuts.begin() + 1, cuts.end() - 1);
  // Keep the pinned values where they were pinned (they are 0 or n: sorting keeps them at the ends).
  return from_cuts(cuts);
}

// The last rank holds nothing (offset n).
std::vector<Slice> trailing_empty_layout(int64_t n, int num_ranks, std::mt19937_64& rng) {
  return random_layout(n, num_ranks, rng, {{num_ranks - 1, n}});
}

// Rank 0 holds nothing (offset 0).
std::vector<Slice> leading_empty_layout(int64_t n, int num_ranks, std::mt19937_64& rng) {
  return random_layout(n, num_ranks, rng, {{1, 0}});
}

// torch.chunk: ceil(n / R) entries per rank, the last ones possibly empty.
std::vector<Slice> chunk_layout(int64_t n, int num_ranks) {
  const int64_t size = (n + num_ranks - 1) / num_ranks;
  std::vector<int64_t> cuts;
  for (int r = 0; r <= num_ranks; ++r) cuts.push_back(std::min<int64_t>(r * size, n));
  return from_cuts(cuts);
}

// Rank `holder` holds [0, n); every other rank holds nothing, at offset
// `empty_offset` (or where contiguity puts it when empty_offset < 0).
std::vector<Slice> whole_on_layout(int64_t n, int num_ranks, int holder, int64_t empty_offset = -1) {
  std::vector<Slice> slices;
  for (int r = 0; r < num_ranks; ++r) {
    if (r == holder) {
      slices.push_back({0, n});
    } else {
      slices.push_back({empty_offset >= 0 ? empty_offset : (r < holder ? 0 : n), 0});
    }
  }
  return slices;
}

// ---- Gradient contents: ties, signed zeros, subnormals ------------------

float subnormal_unit(gmtkDtype_t dtype) {
  if (dtype == GMTK_FLOAT16) return std::ldexp(1.0f, -24);
  if (dtype == GMTK_BFLOAT16) return std::ldexp(1.0f, -133);
  return std::numeric_limits<float>::denorm_min();
}

enum class Content { mixed, zeros_and_subnormals, ties };

void fill_grad(Buffer& b, Content content, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, 99);
  std::uniform_int_distribution<int> level(1, 3);
  std::uniform_int_distribution<int> tiny(1, 20);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float unit = subnormal_unit(b.dtype);
  for (size_t i = 0; i < b.size(); ++i) {
    const int p = pick(rng);
    const float sign = (pick(rng) & 1) ? -1.0f : 1.0f;
    float value = 0.0f;
    switch (content) {
      case Content::mixed:
        if (p < 30) {
          value = sign * scale * static_cast<float>(level(rng));  // heavy ties
        } else if (p < 42) {
          value = 0.0f;
        } else if (p < 52) {
          value = -0.0f;
        } else if (p < 67) {
          value = sign * unit * static_cast<float>(tiny(rng));  // subnormals, with ties
        } else {
          value = scale * normal(rng);
        }
        break;
      case Content::zeros_and_subnormals:
        value = p < 35 ? 0.0f : p < 70 ? -0.0f : sign * unit * static_cast<float>(tiny(rng) % 4 + 1);
        break;
      case Content::ties:
        value = sign * scale * static_cast<float>(level(rng));
        break;
    }
    b.set(i, value);
  }
}

// ---- Scenario: logical tensors, their layouts, and a sequence of calls ----

struct LogicalTensor {
  int64_t n = 0;
  int32_t group = 0;
  bool replica = false;       // a whole tensor on every rank (logical_numel = shard_offset = 0)
  std::vector<Slice> slices;  // per rank, when not a replica
};

enum class OpKind { select, step, mask };

struct Op {
  OpKind kind;
  size_t grad_set;  // which gradients the ranks load before the call
};

const char* op_label(OpKind kind) {
  return kind == OpKind::select ? "gmtkSelectThresholds" : kind == OpKind::step ? "gmtkStep" : "gmtkMaskGradients";
}

struct Scenario {
  std::string label;
  int num_ranks = 1;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<LogicalTensor> tensors;
  gmtkDtype_t grad_dtype = GMTK_FLOAT32;
  gmtkDtype_t param_dtype = GMTK_FLOAT32;
  bool master = false;  // fp32 master weights (16-bit params only)
  unsigned flags = 0;
  bool use_scale = false;
  float inv_loss_scale = 1.0f;
  std::vector<std::vector<Buffer>> grads;  // [grad set][tensor], logical tensors
  std::vector<Buffer> params;              // initial logical parameters
  std::vector<std::vector<float>> masters; // initial logical master weights
  std::vector<Op> ops;
};

// A run's buffers after one call (its local view: slices, or whole tensors).
struct Snapshot {
  std::vector<std::vector<unsigned char>> grad, param;
  std::vector<std::vector<float>> master, exp_avg, exp_avg_sq;
  int64_t step_count = -1;
};

struct CallOut {
  gmtkStatus_t status = GMTK_ERROR_INTERNAL;
  std::string message;
  std::vector<float> thresholds;
  std::vector<int64_t> kept;
  float found_inf = -1.0f;
};

struct RunOut {
  gmtkStatus_t create_status = GMTK_ERROR_INTERNAL;
  std::string create_message;
  std::vector<Slice> held;  // per tensor: which entries of the logical tensor this run holds
  std::vector<CallOut> calls;
  Snapshot initial;
  std::vector<Snapshot> after;  // per op
  std::vector<std::string> failures;
};

struct LocalTensor {
  Buffer grad, param;
  std::vector<float> master, exp_avg, exp_avg_sq;
};

Snapshot take_snapshot(const std::vector<LocalTensor>& locals, int64_t step_count) {
  Snapshot s;
  for (const LocalTensor& l : locals) {
    s.grad.push_back(l.grad.bytes);
    s.param.push_back(l.param.bytes);
    s.master.push_back(l.master);
    s.exp_avg.push_back(l.exp_avg);
    s.exp_avg_sq.push_back(l.exp_avg_sq);
  }
  s.step_count = step_count;
  return s;
}

template <class T>
T* data_or_null(std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

// One run's handle, plan and buffers: `rank`'s slices bound to comm, or the
// whole tensors unsharded when rank < 0 (comm NULL). Makes no Catch2
// assertion: safe on any thread.
struct Runner {
  const Scenario& s;
  gmtkHandle_t handle = nullptr;
  gmtkPlan_t plan = nullptr;
  std::vector<LocalTensor> locals;
  std::vector<Slice> held;
  std::vector<unsigned char> workspace;
  int64_t step_count = 0;
  float inv_loss_scale = 1.0f;
  gmtkStatus_t create_status = GMTK_ERROR_INTERNAL;
  std::string create_message;
  std::vector<std::string> failures;

  Runner(const Scenario& scenario, int rank, gmtkComm_t comm) : s(scenario), inv_loss_scale(scenario.inv_loss_scale) {
    gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
    handle_config.backend = GMTK_BACKEND_CPU_REFERENCE;
    gmtkStatus_t status = gmtkHandleCreate(&handle, &handle_config);
    if (status != GMTK_SUCCESS) {
      create_status = status;
      create_message = std::string("gmtkHandleCreate: ") + gmtkGetLastErrorMessage();
      return;
    }
    const size_t num_tensors = s.tensors.size();
    locals.resize(num_tensors);
    std::vector<gmtkTensor_t> records;
    for (size_t i = 0; i < num_tensors; ++i) {
      const LogicalTensor& logical = s.tensors[i];
      const bool sharded = rank >= 0 && !logical.replica;
      const Slice slice = sharded ? logical.slices[static_cast<size_t>(rank)] : Slice{0, logical.n};
      held.push_back(slice);
      LocalTensor& l = locals[i];
      const auto count = static_cast<size_t>(slice.count);
      const auto offset = static_cast<size_t>(slice.offset);
      l.grad = Buffer(s.grad_dtype, count);
      l.param = Buffer(s.param_dtype, count);
      const size_t pe = Buffer::element_size(s.param_dtype);
      if (count > 0) std::memcpy(l.param.data(), s.params[i].bytes.data() + offset * pe, count * pe);
      if (s.master) l.master.assign(s.masters[i].begin() + offset, s.masters[i].begin() + offset + count);
      l.exp_avg.assign(count, 0.0f);
      l.exp_avg_sq.assign(count, 0.0f);

      gmtkTensor_t record{};
      record.group = logical.group;
      record.numel = slice.count;
      record.grad_dtype = s.grad_dtype;
      record.grad = l.grad.data();
      record.param_dtype = s.param_dtype;
      record.param = l.param.data();
      record.master_param = data_or_null(l.master);
      record.exp_avg = data_or_null(l.exp_avg);
      record.exp_avg_sq = data_or_null(l.exp_avg_sq);
      record.max_exp_avg_sq = nullptr;
      record.logical_numel = sharded ? logical.n : 0;
      record.shard_offset = sharded ? slice.offset : 0;
      records.push_back(record);
    }

    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = s.groups.data();
    config.num_groups = static_cast<int32_t>(s.groups.size());
    config.tensors = records.empty() ? nullptr : records.data();
    config.num_tensors = static_cast<int64_t>(records.size());
    config.flags = s.flags;
    config.comm = comm;
    create_status = gmtkPlanCreate(handle, &config, &plan);
    if (create_status != GMTK_SUCCESS) {
      create_message = gmtkGetLastErrorMessage();
      plan = nullptr;
      return;
    }
    size_t workspace_bytes = 0;
    status = gmtkPlanGetWorkspaceSize(plan, &workspace_bytes);
    if (status != GMTK_SUCCESS) {
      failures.push_back("gmtkPlanGetWorkspaceSize -> " + status_text(status, gmtkGetLastErrorMessage()));
    }
    workspace.resize(workspace_bytes);
  }

  ~Runner() {
    if (plan != nullptr) gmtkPlanDestroy(plan);
    if (handle != nullptr) gmtkHandleDestroy(handle);
  }
  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;

  bool ok() const { return create_status == GMTK_SUCCESS; }

  // Copies this run's part of gradient set `set` into its gradient buffers.
  void load(size_t set) {
    const size_t ge = Buffer::element_size(s.grad_dtype);
    for (size_t i = 0; i < locals.size(); ++i) {
      const Slice slice = held[i];
      if (slice.count > 0) {
        std::memcpy(locals[i].grad.data(), s.grads[set][i].bytes.data() + static_cast<size_t>(slice.offset) * ge,
                    static_cast<size_t>(slice.count) * ge);
      }
    }
  }

  // One call; null_args passes args = NULL (a locally refused call).
  CallOut call(OpKind kind, bool null_args = false) {
    CallOut out;
    out.thresholds.assign(locals.size(), -7.0f);  // sentinels: an unwritten output shows
    out.kept.assign(locals.size(), -7);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step_count = &step_count;
    args.inv_loss_scale = s.use_scale ? &inv_loss_scale : nullptr;
    args.found_inf = &out.found_inf;
    args.thresholds = data_or_null(out.thresholds);
    args.kept_counts = data_or_null(out.kept);
    const gmtkStepArgs_t* a = null_args ? nullptr : &args;
    void* ws = workspace.empty() ? nullptr : workspace.data();
    switch (kind) {
      case OpKind::select: out.status = gmtkSelectThresholds(plan, a, ws, workspace.size(), nullptr); break;
      case OpKind::step: out.status = gmtkStep(plan, a, ws, workspace.size(), nullptr); break;
      case OpKind::mask: out.status = gmtkMaskGradients(plan, a, ws, workspace.size(), nullptr); break;
    }
    if (out.status != GMTK_SUCCESS) out.message = gmtkGetLastErrorMessage();
    return out;
  }

  Snapshot snapshot() const { return take_snapshot(locals, step_count); }
};

// Runs the scenario's calls as `rank` (bound to comm), or unsharded when rank < 0.
RunOut execute(const Scenario& s, int rank, gmtkComm_t comm) {
  RunOut out;
  Runner runner(s, rank, comm);
  out.create_status = runner.create_status;
  out.create_message = runner.create_message;
  out.held = runner.held;
  if (!runner.ok()) return out;
  out.initial = runner.snapshot();
  for (const Op& op : s.ops) {
    runner.load(op.grad_set);
    out.calls.push_back(runner.call(op.kind));
    out.after.push_back(runner.snapshot());
  }
  const gmtkStatus_t status = gmtkPlanDestroy(runner.plan);
  runner.plan = nullptr;
  if (status != GMTK_SUCCESS) runner.failures.push_back("gmtkPlanDestroy -> " + status_text(status, gmtkGetLastErrorMessage()));
  out.failures = runner.failures;
  return out;
}

// Unsharded oracle on the calling thread, then every rank on its own thread.
struct ScenarioResults {
  RunOut oracle;
  std::vector<RunOut> ranks;
};

ScenarioResults run_scenario(const std::shared_ptr<const Scenario>& s) {
  ScenarioResults results;
  results.oracle = execute(*s, -1, nullptr);
  {
    INFO(s->label << ": unsharded oracle plan -> " << status_text(results.oracle.create_status,
                                                                  results.oracle.create_message));
    REQUIRE(results.oracle.create_status == GMTK_SUCCESS);
  }
  for (size_t j = 0; j < results.oracle.calls.size(); ++j) {
    INFO(s->label << ": unsharded " << op_label(s->ops[j].kind) << " #" << j << " -> "
                  << status_text(results.oracle.calls[j].status, results.oracle.calls[j].message));
    REQUIRE(results.oracle.calls[j].status == GMTK_SUCCESS);
  }
  auto comms = make_comms(s->num_ranks);
  auto outs = std::make_shared<std::vector<RunOut>>(static_cast<size_t>(s->num_ranks));
  {
    INFO(s->label);
    REQUIRE_RANKS_RETURN(run_ranks(s->num_ranks, [s, comms, outs](int rank) {
      (*outs)[static_cast<size_t>(rank)] = execute(*s, rank, comms->comms[static_cast<size_t>(rank)]);
    }));
  }
  results.ranks = *outs;
  return results;
}

// Index of the first differing element of two byte ranges (element of `width`
// bytes), or -1 when equal; -2 when the sizes differ.
int64_t first_difference(const unsigned char* a, size_t a_bytes, const unsigned char* b, size_t b_bytes,
                         size_t width) {
  if (a_bytes != b_bytes) return -2;
  for (size_t i = 0; i < a_bytes; ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i / width);
  }
  return -1;
}

template <class T>
const unsigned char* bytes_of(const std::vector<T>& v) {
  return reinterpret_cast<const unsigned char*>(v.data());
}

// The rank's local slice of `whole` (elements of `width` bytes) equals `local`.
void check_slice(const char* what, const unsigned char* whole, size_t whole_bytes, const unsigned char* local,
                 size_t local_bytes, Slice slice, size_t width) {
  const size_t begin = static_cast<size_t>(slice.offset) * width;
  const size_t length = static_cast<size_t>(slice.count) * width;
  REQUIRE(begin + length <= whole_bytes);
  const int64_t diff = first_difference(local, local_bytes, whole + begin, length, width);
  INFO(what << ": first differing entry of the slice " << diff << " (-1: none, -2: sizes differ), slice [" << slice.offset
            << ", " << slice.offset + slice.count << ")");
  CHECK(diff == -1);
}

void check_snapshot(const Scenario& s, const Snapshot& oracle, const Snapshot& got, const std::vector<Slice>& held) {
  CHECK(got.step_count == oracle.step_count);
  const size_t ge = Buffer::element_size(s.grad_dtype);
  const size_t pe = Buffer::element_size(s.param_dtype);
  for (size_t i = 0; i < s.tensors.size(); ++i) {
    INFO("tensor " << i << " (" << s.tensors[i].n << " entries, group " << s.tensors[i].group
                   << (s.tensors[i].replica ? ", replica" : "") << ")");
    check_slice("grad", oracle.grad[i].data(), oracle.grad[i].size(), got.grad[i].data(), got.grad[i].size(), held[i], ge);
    check_slice("param", oracle.param[i].data(), oracle.param[i].size(), got.param[i].data(), got.param[i].size(),
                held[i], pe);
    if (s.master) {
      check_slice("master_param", bytes_of(oracle.master[i]), oracle.master[i].size() * 4, bytes_of(got.master[i]),
                  got.master[i].size() * 4, held[i], 4);
    }
    check_slice("exp_avg", bytes_of(oracle.exp_avg[i]), oracle.exp_avg[i].size() * 4, bytes_of(got.exp_avg[i]),
                got.exp_avg[i].size() * 4, held[i], 4);
    check_slice("exp_avg_sq", bytes_of(oracle.exp_avg_sq[i]), oracle.exp_avg_sq[i].size() * 4,
                bytes_of(got.exp_avg_sq[i]), got.exp_avg_sq[i].size() * 4, held[i], 4);
  }
}

std::string floats_text(const std::vector<float>& v) {
  std::ostringstream os;
  os.precision(9);
  for (float f : v) os << f << " ";
  return os.str();
}
std::string ints_text(const std::vector<int64_t>& v) {
  std::ostringstream os;
  for (int64_t x : v) os << x << " ";
  return os.str();
}

// Every rank against the oracle: statuses, outputs bitwise, slices bitwise.
void check_against_oracle(const Scenario& s, const ScenarioResults& results) {
  INFO(s.label);
  const RunOut& oracle = results.oracle;
  for (int rank = 0; rank < s.num_ranks; ++rank) {
    const RunOut& got = results.ranks[static_cast<size_t>(rank)];
    INFO("rank " << rank << " of " << s.num_ranks);
    {
      INFO("collective gmtkPlanCreate -> " << status_text(got.create_status, got.create_message));
      CHECK(got.create_status == GMTK_SUCCESS);
    }
    if (got.create_status != GMTK_SUCCESS) continue;
    for (const std::string& f : got.failures) {
      INFO(f);
      CHECK(false);
    }
    REQUIRE(got.calls.size() == oracle.calls.size());
    for (size_t j = 0; j < oracle.calls.size(); ++j) {
      const CallOut& want = oracle.calls[j];
      const CallOut& call = got.calls[j];
      INFO("call #" << j << ": " << op_label(s.ops[j].kind) << " on gradient set " << s.ops[j].grad_set);
      {
        INFO(status_text(call.status, call.message));
        CHECK(call.status == GMTK_SUCCESS);
      }
      {
        INFO("thresholds: sharded " << floats_text(call.thresholds) << "/ unsharded " << floats_text(want.thresholds));
        CHECK(first_difference(bytes_of(call.thresholds), call.thresholds.size() * 4, bytes_of(want.thresholds),
                               want.thresholds.size() * 4, 4) == -1);
      }
      {
        INFO("kept_counts: sharded " << ints_text(call.kept) << "/ unsharded " << ints_text(want.kept));
        CHECK(call.kept == want.kept);
      }
      CHECK(float_bits(call.found_inf) == float_bits(want.found_inf));
      check_snapshot(s, oracle.after[j], got.after[j], got.held);
    }
  }
}

// ---- Building scenarios ---------------------------------------------------

gmtkGroupConfig_t make_group(gmtkOptimizer_t optimizer, double ratio, gmtkScope_t scope, gmtkMaskMode_t mode,
                             int variant) {
  gmtkGroupConfig_t g;
  gmtkGroupConfigInit(&g, optimizer);
  g.mask_ratio = ratio;
  g.scope = scope;
  g.mask_mode = mode;
  if (optimizer == GMTK_OPTIMIZER_SGD) {
    g.lr = variant ? 0.02 : 0.05;
    g.momentum = variant ? 0.8 : 0.9;
    g.dampening = variant ? 0.0 : 0.1;
    g.nesterov = variant ? 1 : 0;
    g.weight_decay = 1e-3;
  } else {
    g.lr = variant ? 3e-3 : 1e-2;
    g.weight_decay = variant ? 0.0 : 0.1;
  }
  return g;
}

// Fills grads (num_sets sets), params and masters of the scenario's tensors.
void fill_data(Scenario& s, size_t num_sets, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  s.grads.assign(num_sets, {});
  for (size_t set = 0; set < num_sets; ++set) {
    for (size_t i = 0; i < s.tensors.size(); ++i) {
      Buffer g(s.grad_dtype, static_cast<size_t>(s.tensors[i].n));
      const Content content = i % 5 == 1 ? Content::zeros_and_subnormals : i % 5 == 3 ? Content::ties : Content::mixed;
      // Different scales per tensor, so that global thresholds differ from per-tensor ones.
      const float scale = (i % 3 == 0 ? 8e-3f : i % 3 == 1 ? 1e-3f : 2.5e-4f) * (1.0f + 0.25f * static_cast<float>(set));
      fill_grad(g, content, seed * 1000 + set * 100 + i, scale);
      s.grads[set].push_back(std::move(g));
    }
  }
  s.params.clear();
  s.masters.clear();
  for (size_t i = 0; i < s.tensors.size(); ++i) {
    const auto n = static_cast<size_t>(s.tensors[i].n);
    Buffer p(s.param_dtype, n);
    std::vector<float> m(s.master ? n : 0);
    for (size_t j = 0; j < n; ++j) {
      const float value = normal(rng);
      p.set(j, value);
      if (s.master) m[j] = value;
    }
    s.params.push_back(std::move(p));
    s.masters.push_back(std::move(m));
  }
}

std::string ratio_text(double r) {
  std::ostringstream os;
  os << r;
  return os.str();
}

const double kRatios[] = {0.0, 0.3, 0.9, 0.999, 1.0};

struct DtypePair {
  gmtkDtype_t grad, param;
};
const DtypePair kDtypePairs[] = {{GMTK_FLOAT32, GMTK_FLOAT32},
                                 {GMTK_FLOAT16, GMTK_FLOAT32},
                                 {GMTK_FLOAT16, GMTK_FLOAT16},
                                 {GMTK_BFLOAT16, GMTK_FLOAT32},
                                 {GMTK_BFLOAT16, GMTK_BFLOAT16}};

struct OptimizerMode {
  gmtkOptimizer_t optimizer;
  gmtkMaskMode_t mode;
  const char* label;
};
const OptimizerMode kOptimizerModes[] = {{GMTK_OPTIMIZER_ADAMW, GMTK_MASK_GRAD, "AdamW mask-grad"},
                                         {GMTK_OPTIMIZER_ADAMW, GMTK_MASK_FREEZE, "AdamW freeze"},
                                         {GMTK_OPTIMIZER_SGD, GMTK_MASK_GRAD, "SGD momentum"}};

// The standard sequence: select, three steps, mask.
std::vector<Op> standard_ops() {
  return {{OpKind::select, 0}, {OpKind::step, 0}, {OpKind::step, 1}, {OpKind::step, 2}, {OpKind::mask, 3}};
}

// Sharded logical tensors of sizes 1 .. 30000 in two groups (0 per-tensor,
// 1 global), with uneven layouts, empty ranks (trailing, leading, in the
// middle) and tensors held wholly by one rank.
std::vector<LogicalTensor> sharded_tensors(int num_ranks, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<LogicalTensor> t(8);
  t[0] = {1, 0, false, random_layout(1, num_ranks, rng)};
  t[1] = {7, 1, false, chunk_layout(7, num_ranks)};
  t[2] = {1000, 0, false, trailing_empty_layout(1000, num_ranks, rng)};
  t[3] = {4097, 1, false, leading_empty_layout(4097, num_ranks, rng)};
  t[4] = {30000, 0, false, random_layout(30000, num_ranks, rng)};
  t[5] = {513, 1, false, whole_on_layout(513, num_ranks, num_ranks / 2)};                 // a middle rank
  t[6] = {64, 1, false, trailing_empty_layout(64, num_ranks, rng)};
  t[7] = {100, 0, false, whole_on_layout(100, num_ranks, (num_ranks - 1) / 2, 100)};      // empties at offset n
  return t;
}

std::string layout_text(const std::vector<LogicalTensor>& tensors) {
  std::ostringstream os;
  for (size_t i = 0; i < tensors.size(); ++i) {
    os << "t" << i << "(" << tensors[i].n << (tensors[i].replica ? ", replica" : "") << "):";
    for (const Slice& sl : tensors[i].slices) os << " [" << sl.offset << "+" << sl.count << "]";
    os << "; ";
  }
  return os.str();
}

}  // namespace

// ---- 1. Sharded runs equal the unsharded run bit for bit ----------------

TEST_CASE("sharded plans give every rank the unsharded thresholds, kept counts and updates, bit for bit",
          "[shards]") {
  int index = 0;
  int shift = 0;  // so that each (dtypes, optimizer) pair meets other ratios on other rank counts
  for (int num_ranks : {2, 3, 8}) {
    shift += 2;
    for (const DtypePair& dtypes : kDtypePairs) {
      for (const OptimizerMode& om : kOptimizerModes) {
        ++index;
        auto s = std::make_shared<Scenario>();
        const double ratio0 = kRatios[(index + shift) % 5];
        const double ratio1 = kRatios[(index + shift + 2) % 5];
        s->num_ranks = num_ranks;
        s->grad_dtype = dtypes.grad;
        s->param_dtype = dtypes.param;
        s->master = dtypes.param != GMTK_FLOAT32 && index % 2 == 0;
        s->flags = index % 3 == 0 ? GMTK_PLAN_ALLOCATE_WORKSPACE : 0u;
        s->groups = {make_group(om.optimizer, ratio0, GMTK_SCOPE_PER_TENSOR, om.mode, 0),
                     make_group(om.optimizer, ratio1, GMTK_SCOPE_GLOBAL, om.mode, 1)};
        s->tensors = sharded_tensors(num_ranks, 7000 + static_cast<uint64_t>(index));
        fill_data(*s, 4, static_cast<uint64_t>(index));
        s->ops = standard_ops();
        s->label = std::to_string(num_ranks) + " ranks, grad " + dtype_label(dtypes.grad) + ", param " +
                   dtype_label(dtypes.param) + (s->master ? " + fp32 master" : "") + ", " + om.label +
                   ", ratios " + ratio_text(ratio0) + " (per-tensor) / " + ratio_text(ratio1) + " (global)" +
                   (s->flags ? ", plan-owned workspace" : "") + "; layout " + layout_text(s->tensors);
        const ScenarioResults results = run_scenario(s);
        check_against_oracle(*s, results);
      }
    }
  }
}

TEST_CASE("sharded selection and masking match unsharded for every ratio, dtype and rank count", "[shards]") {
  // Selection and masking only, twice per plan; every ratio on every layout.
  int index = 0;
  for (int num_ranks : {2, 3, 8}) {
    for (gmtkDtype_t dtype : {GMTK_FLOAT32, GMTK_FLOAT16, GMTK_BFLOAT16}) {
      for (double ratio : kRatios) {
        ++index;
        auto s = std::make_shared<Scenario>();
        s->num_ranks = num_ranks;
        s->grad_dtype = dtype;
        s->param_dtype = dtype;
        s->groups = {make_group(GMTK_OPTIMIZER_ADAMW, ratio, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD, 0),
                     make_group(GMTK_OPTIMIZER_ADAMW, ratio, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD, 0)};
        s->tensors = sharded_tensors(num_ranks, 9000 + static_cast<uint64_t>(index));
        fill_data(*s, 2, 500 + static_cast<uint64_t>(index));
        s->ops = {{OpKind::select, 0}, {OpKind::mask, 0}, {OpKind::select, 1}, {OpKind::mask, 1}};
        s->label = std::to_string(num_ranks) + " ranks, grad " + dtype_label(dtype) + ", ratio " + ratio_text(ratio) +
                   " (group 0 global, group 1 per-tensor); layout " + layout_text(s->tensors);
        const ScenarioResults results = run_scenario(s);
        check_against_oracle(*s, results);
        // Masking writes +0 exactly where it masks: the oracle's masked gradient
        // has only kept entries' bits and +0.
        const RunOut& oracle = results.oracle;
        for (size_t i = 0; i < s->tensors.size(); ++i) {
          const Buffer& before = s->grads[0][i];
          const std::vector<unsigned char>& after = oracle.after[1].grad[i];
          Buffer masked(dtype, before.size());
          masked.bytes = after;
          bool ok = true;
          for (size_t j = 0; j < before.size() && ok; ++j) {
            const bool kept = is_kept(before.get(j), oracle.calls[1].thresholds[i]);
            const bool same = Buffer::element_size(dtype) == 4
                                  ? std::memcmp(&before.bytes[j * 4], &masked.bytes[j * 4], 4) == 0
                                  : before.bits16(j) == masked.bits16(j);
            const bool plus_zero = Buffer::element_size(dtype) == 4 ? float_bits(masked.get(j)) == 0u
                                                                    : masked.bits16(j) == 0u;
            ok = kept ? same : plus_zero;
          }
          INFO(s->label << ": tensor " << i << " unsharded mask keeps |g| >= T and writes +0 elsewhere");
          CHECK(ok);
        }
      }
    }
  }
}

// ---- 2. found_inf is the OR over ranks ------------------------------------

namespace {

struct InfCase {
  const char* label;
  int num_ranks;
  gmtkDtype_t grad_dtype;
  size_t tensor;     // which logical tensor gets the bad value
  int rank;          // in which rank's slice
  float value;       // the bad (or, with the scale, overflowing) value
  bool overflow_by_scale;
};

}  // namespace

TEST_CASE("an inf or NaN in one rank's slice makes every rank's step a no-op with found_inf = 1", "[shards]") {
  const float inf = std::numeric_limits<float>::infinity();
  const InfCase cases[] = {
      {"+inf, fp32, per-tensor group, rank 1 of 3", 3, GMTK_FLOAT32, 4, 1, inf, false},
      {"NaN, fp16, global group, last rank of 2", 2, GMTK_FLOAT16, 3, 1, std::numeric_limits<float>::quiet_NaN(),
       false},
      {"-inf, bf16, global group, rank 5 of 8", 8, GMTK_BFLOAT16, 1, 5, -inf, false},
      {"finite 3e38 times inv_loss_scale 2 overflows, fp32, rank 0 of 3", 3, GMTK_FLOAT32, 2, 0, 3e38f, true},
  };
  uint64_t seed = 40;
  for (const InfCase& c : cases) {
    ++seed;
    auto s = std::make_shared<Scenario>();
    s->num_ranks = c.num_ranks;
    s->grad_dtype = c.grad_dtype;
    s->param_dtype = GMTK_FLOAT32;
    s->use_scale = c.overflow_by_scale;
    s->inv_loss_scale = c.overflow_by_scale ? 2.0f : 1.0f;
    s->groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD, 0),
                 make_group(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD, 1)};
    // Tensors: 0 (per-tensor) replica-free layouts where the chosen rank holds
    // entries of the chosen tensor, and other ranks' slices stay finite.
    std::mt19937_64 rng(seed);
    std::vector<LogicalTensor> t(5);
    t[0] = {300, 0, false, trailing_empty_layout(300, c.num_ranks, rng)};
    t[1] = {2000, 1, false, chunk_layout(2000, c.num_ranks)};
    t[2] = {777, 0, false, chunk_layout(777, c.num_ranks)};
    t[3] = {1500, 1, false, chunk_layout(1500, c.num_ranks)};
    t[4] = {900, 0, false, chunk_layout(900, c.num_ranks)};
    s->tensors = t;
    fill_data(*s, 3, seed);
    // Gradient set 1 carries the bad value, in rank c.rank's slice of tensor c.tensor.
    const Slice slice = s->tensors[c.tensor].slices[static_cast<size_t>(c.rank)];
    REQUIRE(slice.count > 0);
    s->grads[1][c.tensor].set(static_cast<size_t>(slice.offset + slice.count / 2), c.value);
    s->ops = {{OpKind::step, 0}, {OpKind::step, 1}, {OpKind::select, 1}, {OpKind::mask, 1}, {OpKind::step, 2}};
    s->label = std::string(c.label) + "; layout " + layout_text(s->tensors);
    const ScenarioResults results = run_scenario(s);
    // The oracle itself reports found_inf on set 1 and not on sets 0 and 2.
    {
      INFO(s->label);
      CHECK(results.oracle.calls[0].found_inf == 0.0f);
      CHECK(results.oracle.calls[1].found_inf == 1.0f);
      CHECK(results.oracle.calls[4].found_inf == 0.0f);
      CHECK(results.oracle.after[4].step_count == 2);
    }
    check_against_oracle(*s, results);
    for (int rank = 0; rank < c.num_ranks; ++rank) {
      const RunOut& got = results.ranks[static_cast<size_t>(rank)];
      if (got.create_status != GMTK_SUCCESS || got.calls.size() != 5) continue;
      INFO(s->label << ": rank " << rank);
      for (size_t j = 1; j <= 3; ++j) {
        INFO("call #" << j << " (" << op_label(s->ops[j].kind) << ") on the gradients with the bad value");
        CHECK(got.calls[j].found_inf == 1.0f);
        // Nothing changed on this rank: parameters, state and step counter
        // keep their bytes (the gradient buffer was reloaded with set 1 before
        // the call, so compare it with set 1's slice).
        const Snapshot& before = got.after[j - 1];
        const Snapshot& after = got.after[j];
        CHECK(after.step_count == 1);
        CHECK(after.param == before.param);
        CHECK(after.master == before.master);
        CHECK(after.exp_avg == before.exp_avg);
        CHECK(after.exp_avg_sq == before.exp_avg_sq);
        for (size_t i = 0; i < s->tensors.size(); ++i) {
          const size_t ge = Buffer::element_size(s->grad_dtype);
          const Slice held = got.held[i];
          const auto* want = s->grads[1][i].bytes.data() + static_cast<size_t>(held.offset) * ge;
          CHECK(first_difference(after.grad[i].data(), after.grad[i].size(), want,
                                 static_cast<size_t>(held.count) * ge, ge) == -1);
        }
      }
      CHECK(got.calls[4].found_inf == 0.0f);
      CHECK(got.after[4].step_count == 2);
    }
  }
}

// ---- 3. Replicas beside shards --------------------------------------------

TEST_CASE("replicas (whole tensors, the same gradient on every rank) beside shards get the unsharded thresholds",
          "[shards]") {
  int index = 0;
  for (int num_ranks : {2, 3}) {
    for (const DtypePair& dtypes : kDtypePairs) {
      for (const OptimizerMode& om : kOptimizerModes) {
        ++index;
        auto s = std::make_shared<Scenario>();
        const double ratio0 = kRatios[(index + num_ranks) % 5];
        const double ratio1 = kRatios[(index + num_ranks + 3) % 5];
        s->num_ranks = num_ranks;
        s->grad_dtype = dtypes.grad;
        s->param_dtype = dtypes.param;
        s->master = dtypes.param != GMTK_FLOAT32 && index % 2 == 1;
        s->groups = {make_group(om.optimizer, ratio0, GMTK_SCOPE_PER_TENSOR, om.mode, 0),
                     make_group(om.optimizer, ratio1, GMTK_SCOPE_PER_TENSOR, om.mode, 1)};
        std::mt19937_64 rng(300 + static_cast<uint64_t>(index));
        std::vector<LogicalTensor> t(6);
        t[0] = {300, 0, true, {}};
        t[1] = {2000, 0, false, random_layout(2000, num_ranks, rng)};
        t[2] = {1, 0, true, {}};
        t[3] = {100, 0, false, whole_on_layout(100, num_ranks, num_ranks / 2)};
        t[4] = {4097, 1, true, {}};
        t[5] = {777, 1, false, trailing_empty_layout(777, num_ranks, rng)};
        s->tensors = t;
        fill_data(*s, 4, 800 + static_cast<uint64_t>(index));
        s->ops = standard_ops();
        s->label = std::to_string(num_ranks) + " ranks, replicas and shards, grad " + dtype_label(dtypes.grad) +
                   ", param " + dtype_label(dtypes.param) + (s->master ? " + fp32 master" : "") + ", " + om.label +
                   ", ratios " + ratio_text(ratio0) + " / " + ratio_text(ratio1) + "; layout " +
                   layout_text(s->tensors);
        const ScenarioResults results = run_scenario(s);
        check_against_oracle(*s, results);
      }
    }
  }
}

// ---- 4. Refusals: every rank fails together, nothing hangs -----------------

namespace {

struct RecordSpec {
  int32_t group = 0;
  int64_t offset = 0;
  int64_t count = 0;
  int64_t logical = 0;
  gmtkDtype_t dtype = GMTK_FLOAT32;
};

struct RankSpec {
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<RecordSpec> records;
};

struct RefusalOut {
  gmtkStatus_t status = GMTK_ERROR_INTERNAL;
  std::string message;
  bool plan_untouched = false;
  // A valid collective plan on the same communicators afterwards.
  gmtkStatus_t after_status = GMTK_ERROR_INTERNAL;
  std::string after_message;
  float after_threshold = -1.0f;
  int64_t after_kept = -1;
};

gmtkPlan_t const kUntouched = reinterpret_cast<gmtkPlan_t>(static_cast<uintptr_t>(0xDEADBEEF));

gmtkGroupConfig_t selection_group(double ratio, gmtkScope_t scope = GMTK_SCOPE_PER_TENSOR) {
  gmtkGroupConfig_t g;
  gmtkGroupConfigInit(&g, GMTK_OPTIMIZER_ADAMW);
  g.mask_ratio = ratio;
  g.scope = scope;
  return g;
}

// On the calling rank's thread: the refused gmtkPlanCreate, then a valid
// collective plan (10 entries 1..10 in torch.chunk slices, ratio 0.5: T = 6,
// kept 5) to show that the communicators are still in step.
RefusalOut refusal_rank(const RankSpec& spec, gmtkComm_t comm, int rank, int comm_size) {
  RefusalOut out;
  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  handle_config.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  if (gmtkHandleCreate(&handle, &handle_config) != GMTK_SUCCESS) {
    out.message = "gmtkHandleCreate failed";
    return out;
  }
  std::vector<Buffer> grads;
  std::vector<gmtkTensor_t> records;
  for (const RecordSpec& r : spec.records) grads.emplace_back(r.dtype, static_cast<size_t>(std::max<int64_t>(r.count, 0)));
  for (size_t i = 0; i < spec.records.size(); ++i) {
    const RecordSpec& r = spec.records[i];
    for (size_t j = 0; j < grads[i].size(); ++j) grads[i].set(j, static_cast<float>(j % 13) * 0.5f);
    gmtkTensor_t t{};
    t.group = r.group;
    t.numel = r.count;
    t.grad_dtype = r.dtype;
    t.grad = grads[i].data();
    t.param_dtype = r.dtype;
    t.logical_numel = r.logical;
    t.shard_offset = r.offset;
    records.push_back(t);
  }
  gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
  config.groups = spec.groups.data();
  config.num_groups = static_cast<int32_t>(spec.groups.size());
  config.tensors = records.empty() ? nullptr : records.data();
  config.num_tensors = static_cast<int64_t>(records.size());
  config.comm = comm;
  gmtkPlan_t plan = kUntouched;
  out.status = gmtkPlanCreate(handle, &config, &plan);
  out.message = gmtkGetLastErrorMessage();  // a fresh thread: "" unless a call failed here
  out.plan_untouched = plan == kUntouched;
  if (out.status == GMTK_SUCCESS && plan != kUntouched) gmtkPlanDestroy(plan);

  if (comm != nullptr) {
    const std::vector<Slice> slices = chunk_layout(10, comm_size);
    const Slice slice = slices[static_cast<size_t>(rank)];
    Buffer g(GMTK_FLOAT32, static_cast<size_t>(slice.count));
    for (size_t j = 0; j < g.size(); ++j) g.set(j, static_cast<float>(slice.offset + static_cast<int64_t>(j) + 1));
    gmtkTensor_t t{};
    t.numel = slice.count;
    t.grad_dtype = GMTK_FLOAT32;
    t.grad = g.data();
    t.param_dtype = GMTK_FLOAT32;
    t.logical_numel = 10;
    t.shard_offset = slice.offset;
    const gmtkGroupConfig_t group = selection_group(0.5);
    gmtkPlanConfig_t valid = GMTK_PLAN_CONFIG_INIT;
    valid.groups = &group;
    valid.num_groups = 1;
    valid.tensors = &t;
    valid.num_tensors = 1;
    valid.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
    valid.comm = comm;
    gmtkPlan_t good = nullptr;
    out.after_status = gmtkPlanCreate(handle, &valid, &good);
    if (out.after_status == GMTK_SUCCESS) {
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      float found_inf = -1.0f;
      args.thresholds = &out.after_threshold;
      args.kept_counts = &out.after_kept;
      args.found_inf = &found_inf;
      out.after_status = gmtkSelectThresholds(good, &args, nullptr, 0, nullptr);
      if (out.after_status != GMTK_SUCCESS) out.after_message = gmtkGetLastErrorMessage();
      gmtkPlanDestroy(good);
    } else {
      out.after_message = gmtkGetLastErrorMessage();
    }
  }
  gmtkHandleDestroy(handle);
  return out;
}

// ranks.size() threads on a communicator of ranks.size() ranks.
void expect_refused_everywhere(const std::string& label, const std::vector<RankSpec>& ranks,
                               gmtkStatus_t expected = GMTK_ERROR_INVALID_ARGUMENT) {
  const int num_ranks = static_cast<int>(ranks.size());
  auto comms = make_comms(num_ranks);
  auto specs = std::make_shared<const std::vector<RankSpec>>(ranks);
  auto outs = std::make_shared<std::vector<RefusalOut>>(ranks.size());
  {
    INFO(label);
    REQUIRE_RANKS_RETURN(run_ranks(num_ranks, [comms, specs, outs, num_ranks](int rank) {
      const auto r = static_cast<size_t>(rank);
      (*outs)[r] = refusal_rank((*specs)[r], comms->comms[r], rank, num_ranks);
    }));
  }
  for (int rank = 0; rank < num_ranks; ++rank) {
    const RefusalOut& out = (*outs)[static_cast<size_t>(rank)];
    INFO(label << ": rank " << rank << " of " << num_ranks << ": gmtkPlanCreate -> " << status_text(out.status, out.message));
    CHECK(out.status == expected);
    CHECK_FALSE(out.message.empty());
    CHECK(out.plan_untouched);
    INFO("then a valid collective plan on the same communicators -> " << status_text(out.after_status, out.after_message));
    CHECK(out.after_status == GMTK_SUCCESS);
    CHECK(out.after_threshold == 6.0f);
    CHECK(out.after_kept == 5);
  }
}

// Every rank: one group, and one record per (offset, count) of a logical tensor of n entries.
std::vector<RankSpec> one_tensor(int64_t n, const std::vector<Slice>& slices, double ratio = 0.5) {
  std::vector<RankSpec> ranks;
  for (const Slice& sl : slices) {
    RankSpec r;
    r.groups = {selection_group(ratio)};
    r.records = {RecordSpec{0, sl.offset, sl.count, n, GMTK_FLOAT32}};
    ranks.push_back(r);
  }
  return ranks;
}

// A valid two-tensor, two-group layout on num_ranks ranks, to be spoiled on one rank.
std::vector<RankSpec> valid_layout(int num_ranks) {
  std::vector<RankSpec> ranks;
  const std::vector<Slice> a = chunk_layout(100, num_ranks);
  const std::vector<Slice> b = chunk_layout(37, num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    RankSpec spec;
    spec.groups = {selection_group(0.3), selection_group(0.7, GMTK_SCOPE_GLOBAL)};
    spec.records = {RecordSpec{0, a[static_cast<size_t>(r)].offset, a[static_cast<size_t>(r)].count, 100, GMTK_FLOAT32},
                    RecordSpec{1, b[static_cast<size_t>(r)].offset, b[static_cast<size_t>(r)].count, 37, GMTK_FLOAT32}};
    ranks.push_back(spec);
  }
  return ranks;
}

}  // namespace

TEST_CASE("a valid layout is accepted by the refusal harness (control)", "[shards]") {
  // The control for the refusal cases below: the same harness on an unspoiled
  // layout succeeds on every rank.
  for (int num_ranks : {2, 3}) {
    const std::vector<RankSpec> ranks = valid_layout(num_ranks);
    auto comms = make_comms(num_ranks);
    auto specs = std::make_shared<const std::vector<RankSpec>>(ranks);
    auto outs = std::make_shared<std::vector<RefusalOut>>(ranks.size());
    REQUIRE_RANKS_RETURN(run_ranks(num_ranks, [comms, specs, outs, num_ranks](int rank) {
      const auto r = static_cast<size_t>(rank);
      (*outs)[r] = refusal_rank((*specs)[r], comms->comms[r], rank, num_ranks);
    }));
    for (int rank = 0; rank < num_ranks; ++rank) {
      const RefusalOut& out = (*outs)[static_cast<size_t>(rank)];
      INFO("rank " << rank << ": " << status_text(out.status, out.message));
      CHECK(out.status == GMTK_SUCCESS);
      CHECK(out.after_status == GMTK_SUCCESS);
      CHECK(out.after_threshold == 6.0f);
    }
  }
}

TEST_CASE("shards that overlap, leave a gap or run past the tensor are refused on every rank", "[shards]") {
  expect_refused_everywhere("overlap: [0,60) and [50,100) of 100", one_tensor(100, {{0, 60}, {50, 50}}));
  expect_refused_everywhere("overlap and gap with counts summing to n: [0,40) [30,60) [60,90) of 100",
                            one_tensor(100, {{0, 40}, {30, 30}, {60, 30}}));
  expect_refused_everywhere("both ranks hold the whole tensor as a shard", one_tensor(100, {{0, 100}, {0, 100}}));
  expect_refused_everywhere("gap: [0,40) and [50,100) of 100", one_tensor(100, {{0, 40}, {50, 50}}));
  expect_refused_everywhere("gap at the end, last rank empty: [0,40) [40,90) [100,100) of 100",
                            one_tensor(100, {{0, 40}, {40, 50}, {100, 0}}));
  expect_refused_everywhere("nobody holds anything of a tensor of 100", one_tensor(100, {{0, 0}, {100, 0}, {50, 0}}));
  expect_refused_everywhere("past the end on rank 2: [0,50) [50,100) [100,110) of 100",
                            one_tensor(100, {{0, 50}, {50, 50}, {100, 10}}));
  expect_refused_everywhere("past the end on rank 0 of 8 (count > logical_numel)",
                            one_tensor(100, {{0, 150}, {100, 0}, {100, 0}, {100, 0}, {100, 0}, {100, 0}, {100, 0},
                                             {100, 0}}));
  expect_refused_everywhere("empty shard at offset 101 > logical_numel 100 on rank 1",
                            one_tensor(100, {{0, 100}, {101, 0}}));
  expect_refused_everywhere("negative shard_offset on rank 0", one_tensor(100, {{-10, 10}, {0, 100}}));
  {
    // Past the end in the second of two tensors, on the middle rank only.
    std::vector<RankSpec> ranks = valid_layout(3);
    ranks[1].records[1].count += 5;
    expect_refused_everywhere("second tensor runs past its end on rank 1 of 3", ranks);
  }
  // Shards laid out for 3 ranks, used on a communicator of 2: [0,34) [34,67) of 100.
  {
    const std::vector<Slice> three = chunk_layout(100, 3);
    expect_refused_everywhere("a 3-rank layout on a 2-rank communicator", one_tensor(100, {three[0], three[1]}));
  }
}

TEST_CASE("ranks whose plans disagree are refused on every rank", "[shards]") {
  {
    std::vector<RankSpec> ranks = valid_layout(3);
    ranks[1].groups[0].mask_ratio = 0.5;
    expect_refused_everywhere("mask_ratio 0.5 on rank 1, 0.3 elsewhere", ranks);
  }
  {
    std::vector<RankSpec> ranks = valid_layout(3);
    ranks[2].groups[1].mask_ratio = 0.75;
    expect_refused_everywhere("global group's mask_ratio differs on the last rank", ranks);
  }
  {
    std::vector<RankSpec> ranks = valid_layout(3);
    ranks[2].records.pop_back();
    expect_refused_everywhere("rank 2 has one tensor fewer", ranks);
  }
  {
    std::vector<RankSpec> ranks = valid_layout(2);
    ranks[0].records.push_back(RecordSpec{0, 0, 16, 0, GMTK_FLOAT32});  // an extra replica
    expect_refused_everywhere("rank 0 has an extra (replica) tensor", ranks);
  }
  {
    // Rank 1 says the first tensor has 101 entries (its slice [50,100) fits in both).
    std::vector<RankSpec> ranks = valid_layout(2);
    ranks[1].records[0].logical = 101;
    expect_refused_everywhere("logical_numel 101 on rank 1, 100 on rank 0", ranks);
  }
  {
    // Two tensors whose logical sizes are swapped on rank 2 of 3 (every slice still fits).
    std::vector<RankSpec> ranks;
    for (int r = 0; r < 3; ++r) {
      RankSpec spec;
      spec.groups = {selection_group(0.5)};
      // A (30 entries): [0,10) [10,20) [20,30); B (40): [0,20) [20,40) and an empty slice at 0.
      const RecordSpec b = r < 2 ? RecordSpec{0, 20 * r, 20, 40, GMTK_FLOAT32} : RecordSpec{0, 0, 0, 30, GMTK_FLOAT32};
      spec.records = {RecordSpec{0, 10 * r, 10, r == 2 ? 40 : 30, GMTK_FLOAT32}, b};
      ranks.push_back(spec);
    }
    expect_refused_everywhere("logical sizes of two tensors swapped on rank 2", ranks);
  }
  {
    std::vector<RankSpec> ranks = valid_layout(2);
    ranks[1].records[0].dtype = GMTK_FLOAT16;
    expect_refused_everywhere("grad dtype fp16 on rank 1, fp32 on rank 0", ranks);
  }
  {
    std::vector<RankSpec> ranks = valid_layout(2);
    ranks[1].groups[0].scope = GMTK_SCOPE_GLOBAL;
    expect_refused_everywhere("group 0 per-tensor on rank 0, global on rank 1", ranks);
  }
  {
    std::vector<RankSpec> ranks = valid_layout(3);
    ranks[0].records[0].group = 1;
    expect_refused_everywhere("tensor 0 in group 1 on rank 0, group 0 elsewhere", ranks);
  }
  {
    std::vector<RankSpec> ranks = valid_layout(2);
    ranks[1].groups.push_back(selection_group(0.3));
    expect_refused_everywhere("rank 1 has an extra group", ranks);
  }
  {
    // Tensor 0 is a replica on rank 0 (whole, logical_numel 0) but a shard elsewhere.
    std::vector<RankSpec> ranks = valid_layout(3);
    ranks[0].records[0] = RecordSpec{0, 0, 100, 0, GMTK_FLOAT32};
    expect_refused_everywhere("tensor 0 a replica on rank 0, sharded on ranks 1 and 2", ranks);
  }
}

TEST_CASE("a global-scope group of shards and replicas together is refused on every rank", "[shards]") {
  // docs/distributed.md: "A global-scope group is all shards or all replicas."
  std::vector<RankSpec> ranks = valid_layout(3);
  for (RankSpec& r : ranks) r.records.push_back(RecordSpec{1, 0, 12, 0, GMTK_FLOAT32});  // a replica in group 1
  expect_refused_everywhere("replica tensor 2 in the global group 1 of shards", ranks, GMTK_ERROR_NOT_SUPPORTED);
}

// Calls on a sharded plan are collective: when the ranks' calls disagree (one
// rank's arguments refused, another operation, another mask ratio set on one
// rank only), every rank fails, nothing is written, and the ranks stay in step.
TEST_CASE("collective calls whose ranks disagree fail together and write nothing", "[shards]") {
  auto s = std::make_shared<Scenario>();
  s->num_ranks = 3;
  s->grad_dtype = GMTK_BFLOAT16;
  s->param_dtype = GMTK_FLOAT32;
  s->groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD, 0),
               make_group(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD, 1)};
  std::mt19937_64 rng(77);
  s->tensors = {{1000, 0, false, random_layout(1000, 3, rng)},
                {500, 1, false, chunk_layout(500, 3)},
                {50, 1, false, whole_on_layout(50, 3, 1)}};
  fill_data(*s, 2, 77);
  s->ops = {{OpKind::step, 0}, {OpKind::step, 1}};
  s->label = "3 ranks; layout " + layout_text(s->tensors);
  const RunOut oracle = execute(*s, -1, nullptr);
  REQUIRE(oracle.create_status == GMTK_SUCCESS);
  REQUIRE(oracle.calls.size() == 2);

  struct Phase {
    const char* label;
    std::vector<CallOut> calls;        // per rank
    std::vector<Snapshot> before, after;
    std::vector<gmtkStatus_t> set_status;
  };
  struct Shared {
    std::vector<Phase> phases;
    std::vector<gmtkStatus_t> create;
    std::vector<std::vector<Slice>> held;
  };
  const char* labels[] = {"rank 1 passes args = NULL", "rank 2 calls gmtkSelectThresholds, the others gmtkStep",
                          "rank 0 changed group 0's mask_ratio to 0.7 (gmtkPlanSetGroupHyperparams)",
                          "all agree: step on gradient set 0", "all agree: step on gradient set 1"};
  auto shared = std::make_shared<Shared>();
  for (const char* l : labels) {
    Phase p;
    p.label = l;
    p.calls.resize(3);
    p.before.resize(3);
    p.after.resize(3);
    p.set_status.assign(3, GMTK_SUCCESS);
    shared->phases.push_back(p);
  }
  shared->create.assign(3, GMTK_ERROR_INTERNAL);
  shared->held.resize(3);
  auto comms = make_comms(3);
  REQUIRE_RANKS_RETURN(run_ranks(3, [s, comms, shared](int rank) {
    const auto r = static_cast<size_t>(rank);
    Runner runner(*s, rank, comms->comms[r]);
    shared->create[r] = runner.create_status;
    shared->held[r] = runner.held;
    if (!runner.ok()) return;
    for (size_t p = 0; p < shared->phases.size(); ++p) {
      Phase& phase = shared->phases[p];
      runner.load(p == 4 ? 1 : 0);
      if (p == 2 && rank == 0) {
        gmtkGroupConfig_t changed = s->groups[0];
        changed.mask_ratio = 0.7;
        phase.set_status[r] = gmtkPlanSetGroupHyperparams(runner.plan, 0, &changed);
      }
      phase.before[r] = runner.snapshot();
      const OpKind kind = (p == 1 && rank == 2) ? OpKind::select : OpKind::step;
      phase.calls[r] = runner.call(kind, p == 0 && rank == 1);
      phase.after[r] = runner.snapshot();
      if (p == 2 && rank == 0) {
        phase.set_status[r] = gmtkPlanSetGroupHyperparams(runner.plan, 0, &s->groups[0]);  // back in agreement
      }
    }
  }));
  for (int rank = 0; rank < 3; ++rank) {
    const auto r = static_cast<size_t>(rank);
    INFO("rank " << rank << "; " << s->label);
    REQUIRE(shared->create[r] == GMTK_SUCCESS);
    for (size_t p = 0; p < shared->phases.size(); ++p) {
      const Phase& phase = shared->phases[p];
      const CallOut& call = phase.calls[r];
      INFO("phase " << p << ": " << phase.label << " -> " << status_text(call.status, call.message));
      CHECK(phase.set_status[r] == GMTK_SUCCESS);
      if (p < 3) {
        CHECK(call.status == GMTK_ERROR_INVALID_ARGUMENT);
        CHECK_FALSE(call.message.empty());
        // Nothing written: not the outputs, not the tensors, not the counter.
        CHECK(floats_text(call.thresholds) == floats_text(std::vector<float>(3, -7.0f)));
        CHECK(call.kept == std::vector<int64_t>(3, -7));
        CHECK(call.found_inf == -1.0f);
        CHECK(phase.after[r].step_count == phase.before[r].step_count);
        CHECK(phase.after[r].param == phase.before[r].param);
        CHECK(phase.after[r].grad == phase.before[r].grad);
        CHECK(phase.after[r].exp_avg == phase.before[r].exp_avg);
        CHECK(phase.after[r].exp_avg_sq == phase.before[r].exp_avg_sq);
      } else {
        const CallOut& want = oracle.calls[p - 3];
        CHECK(call.status == GMTK_SUCCESS);
        INFO("thresholds: sharded " << floats_text(call.thresholds) << "/ unsharded " << floats_text(want.thresholds));
        CHECK(first_difference(bytes_of(call.thresholds), call.thresholds.size() * 4, bytes_of(want.thresholds),
                               want.thresholds.size() * 4, 4) == -1);
        CHECK(call.kept == want.kept);
        CHECK(float_bits(call.found_inf) == float_bits(want.found_inf));
        check_snapshot(*s, oracle.after[p - 3], phase.after[r], shared->held[r]);
      }
    }
  }
}

TEST_CASE("a sharded record in a plan without a communicator is refused", "[shards]") {
  struct Case {
    const char* label;
    RecordSpec record;
  };
  const Case cases[] = {{"first half of 100", {0, 0, 50, 100, GMTK_FLOAT32}},
                        {"second half of 100", {0, 50, 50, 100, GMTK_FLOAT32}},
                        {"empty slice of 100", {0, 100, 0, 100, GMTK_FLOAT32}}};
  for (const Case& c : cases) {
    auto spec = std::make_shared<RankSpec>();
    spec->groups = {selection_group(0.5)};
    spec->records = {RecordSpec{0, 0, 8, 0, GMTK_FLOAT32}, c.record};
    auto out = std::make_shared<RefusalOut>();
    // On a fresh thread, so that its last-error message is this call's.
    REQUIRE_RANKS_RETURN(run_ranks(1, [spec, out](int) { *out = refusal_rank(*spec, nullptr, 0, 1); }));
    INFO(c.label << ": " << status_text(out->status, out->message));
    CHECK(out->status == GMTK_ERROR_INVALID_ARGUMENT);
    CHECK_FALSE(out->message.empty());
    CHECK(out->plan_untouched);
  }
}

// ---- 5. Communicators ---------------------------------------------------------

TEST_CASE("gmtkCommCreateInProcess, GetRank, GetSize and Destroy", "[shards]") {
  gmtkComm_t const sentinel = reinterpret_cast<gmtkComm_t>(static_cast<uintptr_t>(0xC0FFEE));
  for (int bad : {0, -1, -1000}) {
    gmtkComm_t comms[2] = {sentinel, sentinel};
    const gmtkStatus_t status = gmtkCommCreateInProcess(bad, comms);
    const std::string message = gmtkGetLastErrorMessage();
    INFO("num_ranks " << bad << " -> " << status_text(status, message));
    CHECK(status == GMTK_ERROR_INVALID_ARGUMENT);
    CHECK_FALSE(message.empty());
    CHECK(comms[0] == sentinel);
    CHECK(comms[1] == sentinel);
  }
  {
    const gmtkStatus_t status = gmtkCommCreateInProcess(2, nullptr);
    INFO(status_text(status, gmtkGetLastErrorMessage()));
    CHECK(status == GMTK_ERROR_INVALID_ARGUMENT);
  }
  for (int num_ranks : {1, 4}) {
    std::vector<gmtkComm_t> comms(static_cast<size_t>(num_ranks), nullptr);
    REQUIRE(gmtkCommCreateInProcess(num_ranks, comms.data()) == GMTK_SUCCESS);
    for (int r = 0; r < num_ranks; ++r) {
      const gmtkComm_t comm = comms[static_cast<size_t>(r)];
      CHECK(comm != nullptr);
      for (int q = 0; q < r; ++q) CHECK(comm != comms[static_cast<size_t>(q)]);
      int rank = -1;
      int size = -1;
      CHECK(gmtkCommGetRank(comm, &rank) == GMTK_SUCCESS);
      CHECK(gmtkCommGetSize(comm, &size) == GMTK_SUCCESS);
      CHECK(rank == r);
      CHECK(size == num_ranks);
      CHECK(gmtkCommGetRank(comm, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
      CHECK(gmtkCommGetSize(comm, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
    }
    for (gmtkComm_t c : comms) CHECK(gmtkCommDestroy(c) == GMTK_SUCCESS);
  }
  int value = 7;
  CHECK(gmtkCommGetRank(nullptr, &value) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(gmtkCommGetSize(nullptr, &value) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(value == 7);
  CHECK(gmtkCommDestroy(nullptr) == GMTK_SUCCESS);
}

TEST_CASE("a communicator of one rank: a shard that is the whole tensor equals the unsharded plan", "[shards]") {
  for (gmtkDtype_t dtype : {GMTK_FLOAT32, GMTK_BFLOAT16}) {
    auto s = std::make_shared<Scenario>();
    s->num_ranks = 1;
    s->grad_dtype = dtype;
    s->param_dtype = dtype;
    s->groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD, 0),
                 make_group(GMTK_OPTIMIZER_ADAMW, 0.3, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE, 1)};
    // (A global-scope group is all shards or all replicas: the replica is in the per-tensor group.)
    s->tensors = {{1000, 0, false, {{0, 1000}}}, {37, 1, false, {{0, 37}}}, {5, 0, true, {}}, {4097, 1, false, {{0, 4097}}}};
    fill_data(*s, 4, dtype == GMTK_FLOAT32 ? 61 : 62);
    s->ops = standard_ops();
    s->label = std::string("one-rank communicator, ") + dtype_label(dtype);
    check_against_oracle(*s, run_scenario(s));
  }
}

// ---- 6. Callers built against 0.1.0 ------------------------------------------

TEST_CASE("0.1.0 struct sizes (plan config and tensor records) are accepted and behave as unsharded", "[shards]") {
  STATIC_REQUIRE(GMTK_TENSOR_STRUCT_SIZE_V0_1 < sizeof(gmtkTensor_t));
  STATIC_REQUIRE(GMTK_PLAN_CONFIG_STRUCT_SIZE_V0_1 < sizeof(gmtkPlanConfig_t));
  // Two copies of the same tensors: one described with today's sizes (the
  // oracle), one with 0.1.0's, the records packed at 0.1.0's stride.
  struct Variant {
    size_t config_size;
    bool old_tensors;
    const char* label;
  };
  const Variant variants[] = {{GMTK_PLAN_CONFIG_STRUCT_SIZE_V0_1, true, "0.1.0 config, 0.1.0 tensor records"},
                              {sizeof(gmtkPlanConfig_t), true, "current config, 0.1.0 tensor records"},
                              {GMTK_PLAN_CONFIG_STRUCT_SIZE_V0_1, false, "0.1.0 config, current tensor records"}};
  const int64_t sizes[] = {1000, 7, 0, 4097, 1};
  for (const Variant& v : variants) {
    struct State {
      std::vector<TensorData> a, b;  // a: current sizes; b: the variant's
      std::vector<gmtkGroupConfig_t> groups;
      gmtkStatus_t status[2] = {GMTK_ERROR_INTERNAL, GMTK_ERROR_INTERNAL};
      std::string message[2];
      std::vector<gmtkStatus_t> call_status[2];
      int64_t step_count[2] = {0, 0};
      std::vector<std::vector<float>> thresholds_per_call[2];
      std::vector<std::vector<int64_t>> kept_per_call[2];
      float found_inf[2][4] = {};
    };
    auto st = std::make_shared<State>();
    st->groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD, 0),
                  make_group(GMTK_OPTIMIZER_SGD, 0.3, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD, 1)};
    for (size_t i = 0; i < 5; ++i) {
      for (auto* list : {&st->a, &st->b}) {
        list->emplace_back(static_cast<size_t>(sizes[i]), GMTK_BFLOAT16, GMTK_FLOAT32);
        fill_grad(list->back().grad, Content::mixed, 90 + i, 1e-3f);
        Buffer& p = list->back().param;
        std::mt19937_64 rng(190 + i);
        std::normal_distribution<float> normal(0.0f, 0.5f);
        for (size_t j = 0; j < p.size(); ++j) p.set(j, normal(rng));
      }
    }
    // A live 2-rank communicator: the 0.1.0 config has no comm field, so the
    // library must not read the one the struct happens to carry after it (if it
    // did, the call would wait for a rank 1 that never comes: the watchdog fires).
    auto comms = make_comms(2);
    const Variant variant = v;
    REQUIRE_RANKS_RETURN(run_ranks(1, [st, comms, variant](int) {
      const int32_t groups_of[] = {0, 1, 1, 0, 1};
      for (int which = 0; which < 2; ++which) {
        std::vector<TensorData>& data = which == 0 ? st->a : st->b;
        const bool old_records = which == 1 && variant.old_tensors;
        std::vector<gmtkTensor_t> records;
        for (size_t i = 0; i < data.size(); ++i) {
          gmtkTensor_t t = data[i].describe(groups_of[i]);
          t.logical_numel = 0;
          t.shard_offset = 0;
          records.push_back(t);
        }
        const size_t stride = old_records ? GMTK_TENSOR_STRUCT_SIZE_V0_1 : sizeof(gmtkTensor_t);
        // Packed records, followed by guard bytes that would read as a shard.
        std::vector<unsigned char> packed(records.size() * stride + sizeof(gmtkTensor_t), 0xA5);
        for (size_t i = 0; i < records.size(); ++i) std::memcpy(packed.data() + i * stride, &records[i], stride);
        gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
        hc.backend = GMTK_BACKEND_CPU_REFERENCE;
        gmtkHandle_t handle = nullptr;
        gmtkHandleCreate(&handle, &hc);
        gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
        config.struct_size = which == 1 ? variant.config_size : sizeof(gmtkPlanConfig_t);
        config.groups = st->groups.data();
        config.num_groups = 2;
        config.tensors = reinterpret_cast<const gmtkTensor_t*>(packed.data());
        config.num_tensors = static_cast<int64_t>(records.size());
        config.tensor_struct_size = stride;
        config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
        config.comm = (which == 1 && variant.config_size < sizeof(gmtkPlanConfig_t)) ? comms->comms[0] : nullptr;
        gmtkPlan_t plan = kUntouched;
        st->status[which] = gmtkPlanCreate(handle, &config, &plan);
        if (st->status[which] != GMTK_SUCCESS) {
          st->message[which] = gmtkGetLastErrorMessage();
          gmtkHandleDestroy(handle);
          continue;
        }
        packed.assign(packed.size(), 0x5A);  // the plan copied what it needs
        for (int call = 0; call < 4; ++call) {
          std::vector<float> thresholds(records.size(), -7.0f);
          std::vector<int64_t> kept(records.size(), -7);
          gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
          args.step_count = &st->step_count[which];
          args.thresholds = thresholds.data();
          args.kept_counts = kept.data();
          args.found_inf = &st->found_inf[which][call];
          gmtkStatus_t s = call == 0   ? gmtkSelectThresholds(plan, &args, nullptr, 0, nullptr)
                           : call < 3 ? gmtkStep(plan, &args, nullptr, 0, nullptr)
                                      : gmtkMaskGradients(plan, &args, nullptr, 0, nullptr);
          st->call_status[which].push_back(s);
          st->thresholds_per_call[which].push_back(thresholds);
          st->kept_per_call[which].push_back(kept);
        }
        gmtkPlanDestroy(plan);
        gmtkHandleDestroy(handle);
      }
    }));
    INFO(v.label);
    {
      INFO("current sizes -> " << status_text(st->status[0], st->message[0]));
      REQUIRE(st->status[0] == GMTK_SUCCESS);
    }
    {
      INFO("0.1.0 sizes -> " << status_text(st->status[1], st->message[1]));
      REQUIRE(st->status[1] == GMTK_SUCCESS);
    }
    for (int call = 0; call < 4; ++call) {
      INFO("call " << call);
      CHECK(st->call_status[0][static_cast<size_t>(call)] == GMTK_SUCCESS);
      CHECK(st->call_status[1][static_cast<size_t>(call)] == GMTK_SUCCESS);
      CHECK(floats_text(st->thresholds_per_call[1][static_cast<size_t>(call)]) ==
            floats_text(st->thresholds_per_call[0][static_cast<size_t>(call)]));
      CHECK(st->kept_per_call[1][static_cast<size_t>(call)] == st->kept_per_call[0][static_cast<size_t>(call)]);
      CHECK(float_bits(st->found_inf[1][call]) == float_bits(st->found_inf[0][call]));
    }
    CHECK(st->step_count[1] == st->step_count[0]);
    CHECK(st->step_count[1] == 2);
    for (size_t i = 0; i < 5; ++i) {
      INFO("tensor " << i);
      CHECK(st->b[i].grad.bytes == st->a[i].grad.bytes);
      CHECK(st->b[i].param.bytes == st->a[i].param.bytes);
      CHECK(st->b[i].exp_avg == st->a[i].exp_avg);
      CHECK(st->b[i].exp_avg_sq == st->a[i].exp_avg_sq);
    }
  }
}
