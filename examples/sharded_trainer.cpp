// A data-parallel trainer whose optimizer state is sharded ZeRO-style, with
// one Gradient-Mask Tuning step per batch through gmtk's sharded plans.
//
// Every rank holds the whole model (a 16-64-4 tanh MLP, as in mlp_trainer.cpp)
// and runs forward and backward on the host over its own part of each global
// batch. The gradients are averaged over the ranks (all-reduce). Then each
// rank owns a contiguous slice of every parameter tensor (uneven: the last
// ranks may own less, or nothing) with the AdamW state of that slice only, and
// calls gmtkStep on a plan whose records describe those slices
// (logical_numel, shard_offset). gmtk computes the thresholds of the whole
// logical tensors across the ranks, so a 90% mask is 90% of each tensor (and of
// the bias group), not of each slice. Last, the ranks all-gather the updated
// slices so that everyone has the full parameters for the next forward.
//
// Two ways to run it:
//
//   --threads N   N ranks as threads of this process: gmtkCommCreateInProcess,
//                 CPU reference backend, no GPU needed. The all-reduce and the
//                 all-gather go through shared buffers and a barrier. At the end
//                 the trained parameters are compared, bit for bit, with one
//                 unsharded run (one plan without a communicator, the same data
//                 order and the same averaged gradients); the exit status says
//                 whether they matched.
//
//   --ranks N --rank R --id-file PATH
//                 one process per GPU (device R % visible devices): rank 0 makes
//                 an NCCL unique id and writes it to PATH, the others read it;
//                 the ranks make an ncclComm_t, wrap it with
//                 gmtkCommCreateFromNccl and step on the CUDA backend. The
//                 gradients are averaged with ncclAllReduce (ncclAvg), the
//                 slices gathered with grouped ncclBroadcasts (an all-gather of
//                 uneven slices), in place on device buffers. libnccl is not
//                 linked: it is loaded at run time (libnccl.so.2 on the loader's
//                 path, else $GMTK_NCCL_LIBRARY), as gmtk itself does. Rank 0
//                 also runs an unsharded CPU reference step on the same averaged
//                 gradients and compares. This mode is compiled only where CMake
//                 found nccl.h (GMTK_HAVE_NCCL).
//
// Rank 0 prints, per epoch, the mean training loss, the real mask ratio
// (1 - kept entries / entries, from gmtkStep's kept_counts) and whether every
// rank got bitwise the same thresholds at every step.
#include <gmtk/gmtk.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if GMTK_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace {

// ---- The data and the model (host forward and backward) ------------------

constexpr int kInputs = 16;
constexpr int kHidden = 64;
constexpr int kClasses = 4;
constexpr int kSamples = 4096;
constexpr int kRankBatch = 32;  // samples per rank per step: a global batch is kRankBatch * ranks
constexpr int kMaxRanks = kSamples / kRankBatch;

struct DataSet {
  std::vector<float> x;  // kSamples x kInputs
  std::vector<int> label;
};

// A random tanh network whose argmax labels the data: learnable, but not
// linearly separable.
DataSet make_data() {
  std::mt19937 rng(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> t1(kHidden * kInputs), t2(kClasses * kHidden);
  for (float& w : t1) w = 2.0f * normal(rng) / std::sqrt(static_cast<float>(kInputs));
  for (float& w : t2) w = normal(rng) / std::sqrt(static_cast<float>(kHidden));
  DataSet data{std::vector<float>(kSamples * kInputs), std::vector<int>(kSamples)};
  for (int s = 0; s < kSamples; ++s) {
    float* x = &data.x[s * kInputs];
    for (int i = 0; i < kInputs; ++i) x[i] = normal(rng);
    float hidden[kHidden];
    for (int h = 0; h < kHidden; ++h) {
      float sum = 0;
      for (int i = 0; i < kInputs; ++i) sum += t1[h * kInputs + i] * x[i];
      hidden[h] = std::tanh(sum);
    }
    int best = 0;
    float best_score = -1e30f;
    for (int c = 0; c < kClasses; ++c) {
      float score = 0;
      for (int h = 0; h < kHidden; ++h) score += t2[c * kHidden + h] * hidden[h];
      if (score > best_score) best_score = score, best = c;
    }
    data.label[s] = best;
  }
  return data;
}

// The four parameter tensors, flattened one after the other into one buffer.
enum Tensor { kW1, kB1, kW2, kB2, kTensorCount };
const char* const kName[kTensorCount] = {"W1", "b1", "W2", "b2"};
constexpr int64_t kNumel[kTensorCount] = {kHidden * kInputs, kHidden, kClasses* kHidden, kClasses};
constexpr int64_t kOffset[kTensorCount] = {0, kNumel[0], kNumel[0] + kNumel[1], kNumel[0] + kNumel[1] + kNumel[2]};
constexpr int64_t kTotal = kOffset[kB2] + kNumel[kB2];

// The same initial model on every rank.
std::vector<float> initial_params() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(kTotal, 0.0f);
  for (int64_t i = 0; i < kNumel[kW1]; ++i) p[kOffset[kW1] + i] = normal(rng) / std::sqrt(static_cast<float>(kInputs));
  for (int64_t i = 0; i < kNumel[kW2]; ++i) p[kOffset[kW2] + i] = normal(rng) / std::sqrt(static_cast<float>(kHidden));
  return p;
}

// Mean cross-entropy over samples [first, first + count); writes its gradient
// (the mean over those samples) to grad[kTotal].
double loss_and_grad(const float* param, const DataSet& data, int first, int count, float* grad) {
  std::fill(grad, grad + kTotal, 0.0f);
  const float* w1 = param + kOffset[kW1];
  const float* b1 = param + kOffset[kB1];
  const float* w2 = param + kOffset[kW2];
  const float* b2 = param + kOffset[kB2];
  float* gw1 = grad + kOffset[kW1];
  float* gb1 = grad + kOffset[kB1];
  float* gw2 = grad + kOffset[kW2];
  float* gb2 = grad + kOffset[kB2];
  double total = 0;
  const float scale = 1.0f / static_cast<float>(count);
  for (int s = first; s < first + count; ++s) {
    const float* x = &data.x[s * kInputs];
    float hidden[kHidden], logits[kClasses];
    for (int h = 0; h < kHidden; ++h) {
      float sum = b1[h];
      for (int i = 0; i < kInputs; ++i) sum += w1[h * kInputs + i] * x[i];
      hidden[h] = std::tanh(sum);
    }
    float max_logit = -1e30f;
    for (int c = 0; c < kClasses; ++c) {
      float sum = b2[c];
      for (int h = 0; h < kHidden; ++h) sum += w2[c * kHidden + h] * hidden[h];
      logits[c] = sum;
      max_logit = std::max(max_logit, sum);
    }
    float normaliser = 0;
    for (float z : logits) normaliser += std::exp(z - max_logit);
    const int y = data.label[s];
    total += -(logits[y] - max_logit - std::log(normaliser));
    float dlogits[kClasses];
    for (int c = 0; c < kClasses; ++c) {
      dlogits[c] = (std::exp(logits[c] - max_logit) / normaliser - (c == y ? 1.0f : 0.0f)) * scale;
    }
    float dhidden[kHidden] = {};
    for (int c = 0; c < kClasses; ++c) {
      gb2[c] += dlogits[c];
      for (int h = 0; h < kHidden; ++h) {
        gw2[c * kHidden + h] += dlogits[c] * hidden[h];
        dhidden[h] += w2[c * kHidden + h] * dlogits[c];
      }
    }
    for (int h = 0; h < kHidden; ++h) {
      const float dpre = dhidden[h] * (1.0f - hidden[h] * hidden[h]);
      gb1[h] += dpre;
      for (int i = 0; i < kInputs; ++i) gw1[h * kInputs + i] += dpre * x[i];
    }
  }
  return total / count;
}

// First sample of `rank`'s part of global batch `step_in_epoch`: the global
// batch is kRankBatch * ranks consecutive samples, rank r takes the r-th block.
int first_sample(int step_in_epoch, int rank, int ranks) { return (step_in_epoch * ranks + rank) * kRankBatch; }
int steps_per_epoch(int ranks) { return kSamples / (kRankBatch * ranks); }

// ---- The sharded layout and the plan ----------------------------------------

// The slice [begin, end) of tensor t that `rank` owns: FSDP's split, ceil(n /
// ranks) entries per rank, so the last ranks get fewer and possibly none
// (b2's 4 entries over 3 ranks: 2, 2, 0).
struct Slice {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};
Slice owned_slice(int t, int rank, int ranks) {
  const int64_t chunk = (kNumel[t] + ranks - 1) / ranks;
  const int64_t begin = std::min<int64_t>(rank * chunk, kNumel[t]);
  return Slice{begin, std::min<int64_t>(begin + chunk, kNumel[t])};
}
// Entries of optimizer state a rank holds: its slices, packed in tensor order.
int64_t owned_total(int rank, int ranks) {
  int64_t total = 0;
  for (int t = 0; t < kTensorCount; ++t) total += owned_slice(t, rank, ranks).size();
  return total;
}

// Two AdamW groups at mask ratio 0.9: the weights with a threshold per tensor,
// the biases with one threshold over both (global scope) and no weight decay.
void make_groups(gmtkGroupConfig_t groups[2]) {
  for (int g = 0; g < 2; ++g) {
    gmtkGroupConfigInit(&groups[g], GMTK_OPTIMIZER_ADAMW);
    groups[g].lr = 3e-3;
    groups[g].mask_ratio = 0.9;
  }
  groups[0].scope = GMTK_SCOPE_PER_TENSOR;
  groups[1].scope = GMTK_SCOPE_GLOBAL;
  groups[1].weight_decay = 0.0;
}

// One rank's records. `param` and `grad` are the rank's full flat buffers
// (kTotal entries; the records point at its slices), `m` and `v` its packed
// state (owned_total entries). sharded == false: the unsharded plan, whole
// tensors (ranks must be 1 then).
std::vector<gmtkTensor_t> make_records(bool sharded, int rank, int ranks, float* param, float* grad, float* m,
                                       float* v) {
  std::vector<gmtkTensor_t> records(kTensorCount);
  int64_t state_at = 0;
  for (int t = 0; t < kTensorCount; ++t) {
    const Slice slice = sharded ? owned_slice(t, rank, ranks) : Slice{0, kNumel[t]};
    gmtkTensor_t& r = records[t];
    std::memset(&r, 0, sizeof(r));
    r.group = (t == kW1 || t == kW2) ? 0 : 1;
    r.numel = slice.size();
    r.grad_dtype = r.param_dtype = GMTK_FLOAT32;
    if (sharded) {
      r.logical_numel = kNumel[t];
      r.shard_offset = slice.begin;
    }
    if (slice.size() > 0) {  // an empty slice: no buffers at all
      r.grad = grad + kOffset[t] + slice.begin;
      r.param = param + kOffset[t] + slice.begin;
      r.exp_avg = m + state_at;
      r.exp_avg_sq = v + state_at;
    }
    state_at += slice.size();
  }
  return records;
}

gmtkStatus_t create_plan(gmtkHandle_t handle, const std::vector<gmtkTensor_t>& records, gmtkComm_t comm,
                         gmtkPlan_t* plan) {
  gmtkGroupConfig_t groups[2];
  make_groups(groups);
  gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
  config.groups = groups;
  config.num_groups = 2;
  config.tensors = records.data();
  config.num_tensors = static_cast<int64_t>(records.size());
  config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  config.comm = comm;  // with a communicator, plan creation is collective
  return gmtkPlanCreate(handle, &config, plan);
}

void print_layout(int ranks) {
  std::printf("layout (entries each rank owns, and its AdamW state):\n");
  for (int r = 0; r < ranks; ++r) {
    std::printf("  rank %d:", r);
    for (int t = 0; t < kTensorCount; ++t) {
      const Slice s = owned_slice(t, r, ranks);
      if (s.size() == 0) {
        std::printf("  %s -", kName[t]);
      } else {
        std::printf("  %s [%" PRId64 ",%" PRId64 ")", kName[t], s.begin, s.end);
      }
    }
    std::printf("  (%" PRId64 " of %" PRId64 ")\n", owned_total(r, ranks), kTotal);
  }
}

// Per-epoch figures, kept by rank 0.
struct EpochTally {
  double loss_sum = 0;  // sum over steps of the ranks' mean loss
  int64_t kept = 0;     // sum over steps of the kept entries of every tensor
  int64_t steps = 0;
  bool thresholds_agree = true;
  float last_thresholds[kTensorCount] = {};
};

void print_epoch_header() {
  std::printf("  epoch  train loss  real mask ratio  same thresholds on every rank  last T (W1, W2, biases)\n");
}

void print_epoch(int epoch, const EpochTally& e) {
  const double mask_ratio = 1.0 - static_cast<double>(e.kept) / (static_cast<double>(e.steps) * kTotal);
  std::printf("  %5d  %10.4f  %15.4f  %29s  %.3g, %.3g, %.3g\n", epoch, e.loss_sum / e.steps, mask_ratio,
              e.thresholds_agree ? "yes" : "NO", e.last_thresholds[kW1], e.last_thresholds[kW2],
              e.last_thresholds[kB1]);
}

// The data-parallel all-reduce (a mean), summed in rank order so that a run
// with another layout of the same sums gets the same bits.
void average_in_rank_order(const std::vector<std::vector<float>>& slots, int ranks, float* out) {
  for (int64_t i = 0; i < kTotal; ++i) {
    float sum = slots[0][i];
    for (int r = 1; r < ranks; ++r) sum += slots[r][i];
    out[i] = sum / static_cast<float>(ranks);
  }
}

[[noreturn]] void die(const char* what, gmtkStatus_t status) {
  std::fprintf(stderr, "%s failed: %s: %s\n", what, gmtkGetErrorString(status), gmtkGetLastErrorMessage());
  std::fflush(nullptr);
  std::_Exit(1);  // other ranks may be waiting in a collective: do not join them
}

#define GMTK_OR_DIE(call)                             \
  do {                                                \
    const gmtkStatus_t status_ = (call);              \
    if (status_ != GMTK_SUCCESS) die(#call, status_); \
  } while (0)

// ---- --threads N: ranks as threads, CPU reference backend -----------------

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      released_.notify_all();
    } else {
      released_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  int count_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
};

// What the threads share: the buffers of the host all-reduce and all-gather.
struct ThreadsRun {
  int ranks;
  int epochs;
  const DataSet* data;
  Barrier barrier;
  std::vector<std::vector<float>> grad_slots;  // ranks x kTotal: each rank's own gradient
  std::vector<double> losses;                  // each rank's loss of this step
  std::vector<float> gathered_params;          // kTotal: every rank writes its slices here
  std::vector<float> gathered_thresholds;      // ranks x kTensorCount
  std::vector<float> thresholds_history;       // rank 0's thresholds, steps x kTensorCount
  std::vector<std::vector<float>> final_params;
  bool thresholds_agree = true;

  ThreadsRun(int ranks_, int epochs_, const DataSet* data_)
      : ranks(ranks_),
        epochs(epochs_),
        data(data_),
        barrier(ranks_),
        grad_slots(ranks_, std::vector<float>(kTotal)),
        losses(ranks_),
        gathered_params(kTotal),
        gathered_thresholds(static_cast<size_t>(ranks_) * kTensorCount),
        final_params(ranks_) {}
};

void run_thread_rank(ThreadsRun& run, gmtkComm_t comm, int rank) {
  const int ranks = run.ranks;
  std::vector<float> param = initial_params();
  std::vector<float> grad(kTotal);  // the averaged gradient (the records point at this rank's slices)
  std::vector<float> m(owned_total(rank, ranks), 0.0f), v(owned_total(rank, ranks), 0.0f);

  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  handle_config.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  GMTK_OR_DIE(gmtkHandleCreate(&handle, &handle_config));
  gmtkPlan_t plan = nullptr;
  GMTK_OR_DIE(
      create_plan(handle, make_records(true, rank, ranks, param.data(), grad.data(), m.data(), v.data()), comm, &plan));

  int64_t step = 0;
  for (int epoch = 1; epoch <= run.epochs; ++epoch) {
    EpochTally tally;
    for (int s = 0; s < steps_per_epoch(ranks); ++s) {
      // Forward and backward on this rank's part of the batch.
      run.losses[rank] =
          loss_and_grad(param.data(), *run.data, first_sample(s, rank, ranks), kRankBatch, run.grad_slots[rank].data());
      run.barrier.wait();  // every rank's gradient is in its slot

      // All-reduce (every rank computes the same mean; the step reads only its slices).
      average_in_rank_order(run.grad_slots, ranks, grad.data());
      if (rank == 0) {
        double mean_loss = 0;
        for (int r = 0; r < ranks; ++r) mean_loss += run.losses[r];
        tally.loss_sum += mean_loss / ranks;
      }

      // The sharded GMT step: collective over the ranks' communicators.
      float thresholds[kTensorCount];
      int64_t kept[kTensorCount];
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.step = ++step;
      args.thresholds = thresholds;
      args.kept_counts = kept;
      GMTK_OR_DIE(gmtkStep(plan, &args, nullptr, 0, nullptr));

      // All-gather: this rank's updated slices (and its thresholds) into the shared buffers.
      for (int t = 0; t < kTensorCount; ++t) {
        const Slice slice = owned_slice(t, rank, ranks);
        std::copy(param.begin() + kOffset[t] + slice.begin, param.begin() + kOffset[t] + slice.end,
                  run.gathered_params.begin() + kOffset[t] + slice.begin);
      }
      std::memcpy(&run.gathered_thresholds[rank * kTensorCount], thresholds, sizeof(thresholds));
      run.barrier.wait();  // every slice is in
      param = run.gathered_params;

      if (rank == 0) {
        for (int r = 1; r < ranks; ++r) {
          if (std::memcmp(&run.gathered_thresholds[r * kTensorCount], thresholds, sizeof(thresholds)) != 0) {
            tally.thresholds_agree = run.thresholds_agree = false;
          }
        }
        for (int64_t k : kept) tally.kept += k;  // a shard's kept count is its logical tensor's
        ++tally.steps;
        std::memcpy(tally.last_thresholds, thresholds, sizeof(thresholds));
        run.thresholds_history.insert(run.thresholds_history.end(), thresholds, thresholds + kTensorCount);
      }
      // The next writes to the shared buffers come after the next step's first
      // barrier, which every rank reaches only after reading them here.
    }
    if (rank == 0) print_epoch(epoch, tally);
  }
  run.final_params[rank] = param;
  GMTK_OR_DIE(gmtkPlanDestroy(plan));
  GMTK_OR_DIE(gmtkHandleDestroy(handle));
}

// The same training without sharding: one plan without a communicator over
// the whole tensors, the ranks' gradients computed one after the other here
// and averaged as the sharded run averages them.
void run_unsharded(int ranks, int epochs, const DataSet& data, std::vector<float>* params_out,
                   std::vector<float>* thresholds_out) {
  std::vector<float> param = initial_params();
  std::vector<float> grad(kTotal), m(kTotal, 0.0f), v(kTotal, 0.0f);
  std::vector<std::vector<float>> slots(ranks, std::vector<float>(kTotal));
  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  handle_config.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  GMTK_OR_DIE(gmtkHandleCreate(&handle, &handle_config));
  gmtkPlan_t plan = nullptr;
  GMTK_OR_DIE(
      create_plan(handle, make_records(false, 0, 1, param.data(), grad.data(), m.data(), v.data()), nullptr, &plan));
  int64_t step = 0;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    for (int s = 0; s < steps_per_epoch(ranks); ++s) {
      for (int r = 0; r < ranks; ++r)
        loss_and_grad(param.data(), data, first_sample(s, r, ranks), kRankBatch, slots[r].data());
      average_in_rank_order(slots, ranks, grad.data());
      float thresholds[kTensorCount];
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.step = ++step;
      args.thresholds = thresholds;
      GMTK_OR_DIE(gmtkStep(plan, &args, nullptr, 0, nullptr));
      thresholds_out->insert(thresholds_out->end(), thresholds, thresholds + kTensorCount);
    }
  }
  *params_out = param;
  GMTK_OR_DIE(gmtkPlanDestroy(plan));
  GMTK_OR_DIE(gmtkHandleDestroy(handle));
}

int run_threads(int ranks, int epochs) {
  const DataSet data = make_data();
  std::printf(
      "%d ranks as threads (in-process communicator, CPU reference backend); %d steps of %d x %d samples "
      "per epoch\n",
      ranks, steps_per_epoch(ranks), ranks, kRankBatch);
  print_layout(ranks);
  std::vector<gmtkComm_t> comms(ranks);
  GMTK_OR_DIE(gmtkCommCreateInProcess(ranks, comms.data()));
  ThreadsRun run(ranks, epochs, &data);
  print_epoch_header();
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) threads.emplace_back(run_thread_rank, std::ref(run), comms[r], r);
  for (std::thread& t : threads) t.join();
  for (gmtkComm_t c : comms) GMTK_OR_DIE(gmtkCommDestroy(c));  // after the plans

  bool replicas_agree = true;
  for (int r = 1; r < ranks; ++r) replicas_agree = replicas_agree && run.final_params[r] == run.final_params[0];

  std::vector<float> unsharded_params, unsharded_thresholds;
  run_unsharded(ranks, epochs, data, &unsharded_params, &unsharded_thresholds);
  const bool same_params =
      std::memcmp(unsharded_params.data(), run.final_params[0].data(), kTotal * sizeof(float)) == 0;
  const bool same_thresholds = unsharded_thresholds.size() == run.thresholds_history.size() &&
                               std::memcmp(unsharded_thresholds.data(), run.thresholds_history.data(),
                                           unsharded_thresholds.size() * sizeof(float)) == 0;
  int64_t differing = 0;
  for (int64_t i = 0; i < kTotal; ++i) {
    if (std::memcmp(&unsharded_params[i], &run.final_params[0][i], sizeof(float)) != 0) ++differing;
  }
  std::printf("every rank holds the same parameters: %s\n", replicas_agree ? "yes" : "NO");
  std::printf("every step's thresholds == the unsharded plan's: %s\n", same_thresholds ? "yes" : "no");
  std::printf("sharded == unsharded: %s", same_params && same_thresholds && replicas_agree ? "yes" : "no");
  if (differing > 0) std::printf(" (%" PRId64 " of %" PRId64 " parameters differ)", differing, kTotal);
  std::printf("\n");
  return same_params && same_thresholds && replicas_agree && run.thresholds_agree ? 0 : 1;
}

// ---- --ranks N --rank R --id-file PATH: one process per GPU, NCCL ---------

#if GMTK_HAVE_NCCL

// NCCL's functions, from the libnccl.so.2 the loader finds or
// $GMTK_NCCL_LIBRARY: loaded before gmtkCommCreateFromNccl, so gmtk finds this
// same copy (a communicator must be driven by the library that made it).
struct Nccl {
  void* library = nullptr;
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRank) comm_init_rank = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclGetErrorString) get_error_string = nullptr;
  decltype(&ncclAllReduce) all_reduce = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  decltype(&ncclBroadcast) broadcast = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;

  bool load(std::string* error) {
    library = dlopen("libnccl.so.2", RTLD_NOW);
    if (library == nullptr) {
      *error = std::string("dlopen(\"libnccl.so.2\"): ") + dlerror();
      const char* path = std::getenv("GMTK_NCCL_LIBRARY");
      if (path == nullptr || path[0] == '\0') {
        *error += "; set GMTK_NCCL_LIBRARY to a libnccl.so.2 (e.g. the pip package nvidia-nccl-cu13's)";
        return false;
      }
      library = dlopen(path, RTLD_NOW);
      if (library == nullptr) {
        *error += std::string("; dlopen($GMTK_NCCL_LIBRARY): ") + dlerror();
        return false;
      }
    }
    bool ok = true;
    auto find = [&](auto* function, const char* name) {
      *function = reinterpret_cast<std::remove_pointer_t<decltype(function)>>(dlsym(library, name));
      if (*function == nullptr) {
        *error += std::string(error->empty() ? "" : "; ") + "libnccl has no " + name;
        ok = false;
      }
    };
    find(&get_unique_id, "ncclGetUniqueId");
    find(&comm_init_rank, "ncclCommInitRank");
    find(&comm_destroy, "ncclCommDestroy");
    find(&get_error_string, "ncclGetErrorString");
    find(&all_reduce, "ncclAllReduce");
    find(&all_gather, "ncclAllGather");
    find(&broadcast, "ncclBroadcast");
    find(&group_start, "ncclGroupStart");
    find(&group_end, "ncclGroupEnd");
    return ok;
  }
};

int g_rank = 0;  // for messages

[[noreturn]] void die_rank(const std::string& message) {
  std::fprintf(stderr, "rank %d: %s\n", g_rank, message.c_str());
  std::fflush(nullptr);
  std::_Exit(1);  // the other ranks will wait in their next collective: stop them too
}

#define CUDA_OR_DIE(call)                                                                        \
  do {                                                                                           \
    const cudaError_t error_ = (call);                                                           \
    if (error_ != cudaSuccess) die_rank(std::string(#call) + ": " + cudaGetErrorString(error_)); \
  } while (0)

#define NCCL_OR_DIE(nccl, call)                                                                         \
  do {                                                                                                  \
    const ncclResult_t result_ = (call);                                                                \
    if (result_ != ncclSuccess) die_rank(std::string(#call) + ": " + (nccl).get_error_string(result_)); \
  } while (0)

#define GMTK_OR_DIE_RANK(call)                                                                              \
  do {                                                                                                      \
    const gmtkStatus_t status_ = (call);                                                                    \
    if (status_ != GMTK_SUCCESS)                                                                            \
      die_rank(std::string(#call) + ": " + gmtkGetErrorString(status_) + ": " + gmtkGetLastErrorMessage()); \
  } while (0)

// Rank 0 writes the unique id to PATH.tmp and renames it to PATH (atomic: the
// others never see a partial file); the others poll for PATH with the id's size.
void exchange_unique_id(const Nccl& nccl, int rank, const std::string& path, double timeout_s, ncclUniqueId* id) {
  if (rank == 0) {
    NCCL_OR_DIE(nccl, nccl.get_unique_id(id));
    const std::string tmp = path + ".tmp";
    FILE* file = std::fopen(tmp.c_str(), "wb");
    if (file == nullptr) die_rank("cannot write " + tmp + ": " + std::strerror(errno));
    const bool written =
        std::fwrite(id, sizeof(*id), 1, file) == 1 && std::fflush(file) == 0 && fsync(fileno(file)) == 0;
    if (std::fclose(file) != 0 || !written) die_rank("cannot write " + tmp + ": " + std::strerror(errno));
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      die_rank("cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
    }
    return;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && st.st_size == static_cast<off_t>(sizeof(*id))) {
      FILE* file = std::fopen(path.c_str(), "rb");
      if (file != nullptr) {
        const bool read = std::fread(id, sizeof(*id), 1, file) == 1;
        std::fclose(file);
        if (read) return;
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      char message[512];
      std::snprintf(message, sizeof(message),
                    "no NCCL unique id in %s after %.0f s: is rank 0 running, with the same --id-file, on a file "
                    "system this process sees? (--timeout S waits longer)",
                    path.c_str(), timeout_s);
      die_rank(message);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

int ulp_distance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if (ia < 0) ia = INT32_MIN - ia;  // order the negative floats below the positive ones
  if (ib < 0) ib = INT32_MIN - ib;
  const int64_t d = static_cast<int64_t>(ia) - ib;
  return static_cast<int>(std::min<int64_t>(d < 0 ? -d : d, INT32_MAX));
}

int run_nccl(int ranks, int rank, const std::string& id_file, int epochs, double timeout_s) {
  g_rank = rank;
  int devices = 0;
  CUDA_OR_DIE(cudaGetDeviceCount(&devices));
  const int device = rank % devices;
  CUDA_OR_DIE(cudaSetDevice(device));
  Nccl nccl;
  std::string error;
  if (!nccl.load(&error)) die_rank("no usable libnccl: " + error);

  ncclUniqueId id;
  exchange_unique_id(nccl, rank, id_file, timeout_s, &id);
  ncclComm_t nccl_comm = nullptr;
  NCCL_OR_DIE(nccl, nccl.comm_init_rank(&nccl_comm, ranks, id, rank));
  // Every rank has joined, so every rank has read the id: remove the file so a
  // later run cannot pick up this stale one.
  if (rank == 0) std::remove(id_file.c_str());
  gmtkComm_t comm = nullptr;
  GMTK_OR_DIE_RANK(gmtkCommCreateFromNccl(nccl_comm, device, &comm));

  const DataSet data = make_data();
  std::vector<float> param = initial_params();
  std::vector<float> grad(kTotal);
  const int64_t owned = owned_total(rank, ranks);
  constexpr int kStats = kTensorCount + 1;  // a rank's thresholds and loss, all-gathered

  cudaStream_t stream = nullptr;
  CUDA_OR_DIE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  float *d_param = nullptr, *d_grad = nullptr, *d_m = nullptr, *d_v = nullptr, *d_stats = nullptr,
        *d_gathered = nullptr;
  int64_t* d_kept = nullptr;
  CUDA_OR_DIE(cudaMalloc(&d_param, kTotal * sizeof(float)));
  CUDA_OR_DIE(cudaMalloc(&d_grad, kTotal * sizeof(float)));
  if (owned > 0) {  // a rank may own nothing at all
    CUDA_OR_DIE(cudaMalloc(&d_m, owned * sizeof(float)));
    CUDA_OR_DIE(cudaMalloc(&d_v, owned * sizeof(float)));
    CUDA_OR_DIE(cudaMemset(d_m, 0, owned * sizeof(float)));
    CUDA_OR_DIE(cudaMemset(d_v, 0, owned * sizeof(float)));
  }
  CUDA_OR_DIE(cudaMalloc(&d_stats, kStats * sizeof(float)));
  CUDA_OR_DIE(cudaMalloc(&d_gathered, static_cast<size_t>(ranks) * kStats * sizeof(float)));
  CUDA_OR_DIE(cudaMalloc(&d_kept, kTensorCount * sizeof(int64_t)));
  CUDA_OR_DIE(cudaMemcpy(d_param, param.data(), kTotal * sizeof(float), cudaMemcpyHostToDevice));

  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  handle_config.backend = GMTK_BACKEND_CUDA;
  handle_config.device = device;
  gmtkHandle_t handle = nullptr;
  GMTK_OR_DIE_RANK(gmtkHandleCreate(&handle, &handle_config));
  gmtkPlan_t plan = nullptr;
  GMTK_OR_DIE_RANK(create_plan(handle, make_records(true, rank, ranks, d_param, d_grad, d_m, d_v), comm, &plan));

  // Rank 0's unsharded CPU reference: the same averaged gradients, whole tensors.
  std::vector<float> ref_param, ref_grad, ref_m, ref_v;
  gmtkHandle_t ref_handle = nullptr;
  gmtkPlan_t ref_plan = nullptr;
  if (rank == 0) {
    ref_param = param;
    ref_grad.assign(kTotal, 0.0f);
    ref_m.assign(kTotal, 0.0f);
    ref_v.assign(kTotal, 0.0f);
    gmtkHandleConfig_t ref_config = GMTK_HANDLE_CONFIG_INIT;
    ref_config.backend = GMTK_BACKEND_CPU_REFERENCE;
    GMTK_OR_DIE_RANK(gmtkHandleCreate(&ref_handle, &ref_config));
    GMTK_OR_DIE_RANK(create_plan(
        ref_handle, make_records(false, 0, 1, ref_param.data(), ref_grad.data(), ref_m.data(), ref_v.data()), nullptr,
        &ref_plan));
    std::printf("%d ranks as processes (NCCL communicator, CUDA backend); %d steps of %d x %d samples per epoch\n",
                ranks, steps_per_epoch(ranks), ranks, kRankBatch);
    print_layout(ranks);
    print_epoch_header();
  }

  bool thresholds_agree = true, reference_thresholds_agree = true;
  std::vector<float> gathered(static_cast<size_t>(ranks) * kStats);
  int64_t kept[kTensorCount];
  float loss = 0;  // stays valid until the stream is synchronized
  int64_t step = 0;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    EpochTally tally;
    for (int s = 0; s < steps_per_epoch(ranks); ++s) {
      loss =
          static_cast<float>(loss_and_grad(param.data(), data, first_sample(s, rank, ranks), kRankBatch, grad.data()));
      CUDA_OR_DIE(cudaMemcpyAsync(d_grad, grad.data(), kTotal * sizeof(float), cudaMemcpyHostToDevice, stream));
      CUDA_OR_DIE(cudaMemcpyAsync(d_stats + kTensorCount, &loss, sizeof(float), cudaMemcpyHostToDevice, stream));
      // All-reduce: the mean gradient on every rank.
      NCCL_OR_DIE(nccl, nccl.all_reduce(d_grad, d_grad, kTotal, ncclFloat, ncclAvg, nccl_comm, stream));

      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.step = ++step;
      args.thresholds = d_stats;
      args.kept_counts = d_kept;
      GMTK_OR_DIE_RANK(gmtkStep(plan, &args, nullptr, 0, reinterpret_cast<gmtkStream_t>(stream)));

      // All-gather of the uneven slices: each owner broadcasts its slice of
      // each tensor, in place, in one NCCL group.
      NCCL_OR_DIE(nccl, nccl.group_start());
      for (int t = 0; t < kTensorCount; ++t) {
        for (int r = 0; r < ranks; ++r) {
          const Slice slice = owned_slice(t, r, ranks);
          if (slice.size() == 0) continue;
          float* at = d_param + kOffset[t] + slice.begin;
          NCCL_OR_DIE(nccl, nccl.broadcast(at, at, slice.size(), ncclFloat, r, nccl_comm, stream));
        }
      }
      NCCL_OR_DIE(nccl, nccl.group_end());
      NCCL_OR_DIE(nccl, nccl.all_gather(d_stats, d_gathered, kStats, ncclFloat, nccl_comm, stream));

      CUDA_OR_DIE(cudaMemcpyAsync(param.data(), d_param, kTotal * sizeof(float), cudaMemcpyDeviceToHost, stream));
      if (rank == 0) {
        CUDA_OR_DIE(cudaMemcpyAsync(gathered.data(), d_gathered, gathered.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream));
        CUDA_OR_DIE(cudaMemcpyAsync(kept, d_kept, sizeof(kept), cudaMemcpyDeviceToHost, stream));
        CUDA_OR_DIE(cudaMemcpyAsync(ref_grad.data(), d_grad, kTotal * sizeof(float), cudaMemcpyDeviceToHost, stream));
      }
      CUDA_OR_DIE(cudaStreamSynchronize(stream));  // errors of the step's kernels surface here

      if (rank == 0) {
        double mean_loss = 0;
        for (int r = 0; r < ranks; ++r) {
          mean_loss += gathered[r * kStats + kTensorCount];
          if (std::memcmp(&gathered[r * kStats], &gathered[0], kTensorCount * sizeof(float)) != 0) {
            tally.thresholds_agree = thresholds_agree = false;
          }
        }
        tally.loss_sum += mean_loss / ranks;
        for (int64_t k : kept) tally.kept += k;
        ++tally.steps;
        std::memcpy(tally.last_thresholds, &gathered[0], sizeof(tally.last_thresholds));

        float ref_thresholds[kTensorCount];
        gmtkStepArgs_t ref_args = GMTK_STEP_ARGS_INIT;
        ref_args.step = step;
        ref_args.thresholds = ref_thresholds;
        GMTK_OR_DIE_RANK(gmtkStep(ref_plan, &ref_args, nullptr, 0, nullptr));
        if (std::memcmp(ref_thresholds, &gathered[0], sizeof(ref_thresholds)) != 0) reference_thresholds_agree = false;
      }
    }
    if (rank == 0) print_epoch(epoch, tally);
  }

  int status = 0;
  if (rank == 0) {
    int64_t differing = 0;
    int max_ulp = 0;
    for (int64_t i = 0; i < kTotal; ++i) {
      if (std::memcmp(&ref_param[i], &param[i], sizeof(float)) != 0) ++differing;
      max_ulp = std::max(max_ulp, ulp_distance(ref_param[i], param[i]));
    }
    std::printf("every step's thresholds == the unsharded CPU reference's (same averaged gradients): %s\n",
                reference_thresholds_agree ? "yes" : "NO");
    std::printf("sharded (CUDA, %d ranks) == unsharded CPU reference: %s", ranks, differing == 0 ? "yes" : "no");
    if (differing > 0) {
      std::printf(" (%" PRId64 " of %" PRId64
                  " parameters differ, by up to %d ulp; the CUDA step's contract is "
                  "4 ulp per step: docs/semantics.md)",
                  differing, kTotal, max_ulp);
    }
    std::printf("\n");
    // Thresholds are exact by design: a difference there is a failure.
    status = thresholds_agree && reference_thresholds_agree ? 0 : 1;
    gmtkPlanDestroy(ref_plan);
    gmtkHandleDestroy(ref_handle);
  }

  GMTK_OR_DIE_RANK(gmtkPlanDestroy(plan));
  GMTK_OR_DIE_RANK(gmtkCommDestroy(comm));  // after its plans, before the ncclComm_t
  NCCL_OR_DIE(nccl, nccl.comm_destroy(nccl_comm));
  GMTK_OR_DIE_RANK(gmtkHandleDestroy(handle));
  for (void* p :
       {static_cast<void*>(d_param), static_cast<void*>(d_grad), static_cast<void*>(d_m), static_cast<void*>(d_v),
        static_cast<void*>(d_stats), static_cast<void*>(d_gathered), static_cast<void*>(d_kept)}) {
    cudaFree(p);
  }
  cudaStreamDestroy(stream);
  return status;
}

#else  // !GMTK_HAVE_NCCL

int run_nccl(int, int, const std::string&, int, double) {
  std::fprintf(stderr,
               "this build has no NCCL: nccl.h was not found when it was configured (set GMTK_NCCL_ROOT or "
               "-DGMTK_NCCL_INCLUDE_DIR=... and rebuild); --threads N runs without it\n");
  return 1;
}

#endif  // GMTK_HAVE_NCCL

void usage(const char* program) {
  std::fprintf(stderr,
               "usage:\n"
               "  %s --threads N [--epochs E]\n"
               "      N ranks (1 to %d) as threads of this process: in-process communicator, CPU reference\n"
               "      backend, no GPU needed. Ends by comparing the trained parameters, bit for bit, with an\n"
               "      unsharded run (exit status 1 if they differ).\n"
               "  %s --ranks N --rank R --id-file PATH [--epochs E] [--timeout S]\n"
               "      rank R of N, one process per GPU (CUDA device R %% the visible devices; NCCL takes one rank\n"
               "      per GPU), through NCCL. Rank 0 writes the NCCL unique id to PATH (via PATH.tmp and a rename)\n"
               "      and removes it once every rank has joined; the others wait up to S seconds (default 120)\n"
               "      for it. Delete a PATH that a failed run left behind before launching. libnccl.so.2 is\n"
               "      loaded at run time from the loader's path or $GMTK_NCCL_LIBRARY. On one node with 4 GPUs:\n"
               "        for r in 0 1 2 3; do build/examples/gmtk_example_sharded --ranks 4 --rank $r "
               "--id-file /tmp/gmtk.id & done; wait\n"
               "      (across nodes: PATH on a file system every node sees, R the global rank, and R %% GPUs per\n"
               "      node the local GPU)\n"
               "  E: epochs, default 5.\n",
               program, kMaxRanks, program);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, ranks = 0, rank = -1, epochs = 5;
  double timeout_s = 120;
  std::string id_file;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    const size_t equals = arg.find('=');
    if (arg.rfind("--", 0) == 0 && equals != std::string::npos) {  // --name=value
      value = arg.substr(equals + 1);
      arg.resize(equals);
    } else if (i + 1 < argc) {
      value = argv[i + 1];
      ++i;
    } else {
      usage(argv[0]);
      return 2;
    }
    char* end = nullptr;
    const long number = std::strtol(value.c_str(), &end, 10);
    const bool is_number = !value.empty() && *end == '\0';
    if (arg == "--threads" && is_number) {
      threads = static_cast<int>(number);
    } else if (arg == "--ranks" && is_number) {
      ranks = static_cast<int>(number);
    } else if (arg == "--rank" && is_number) {
      rank = static_cast<int>(number);
    } else if (arg == "--epochs" && is_number) {
      epochs = static_cast<int>(number);
    } else if (arg == "--timeout" && is_number) {
      timeout_s = static_cast<double>(number);
    } else if (arg == "--id-file") {
      id_file = value;
    } else {
      usage(argv[0]);
      return 2;
    }
  }
  const bool threads_mode = threads > 0 && ranks == 0 && rank < 0 && id_file.empty();
  const bool nccl_mode = threads == 0 && ranks > 0 && rank >= 0 && rank < ranks && !id_file.empty();
  if ((!threads_mode && !nccl_mode) || epochs < 1 || threads > kMaxRanks || ranks > kMaxRanks || timeout_s <= 0) {
    usage(argv[0]);
    return 2;
  }
  int version = 0;
  gmtkGetVersion(&version);
  if (threads_mode || rank == 0) {
    std::printf(
        "gmtk %d.%d.%d: a 16-64-4 MLP, data parallel, AdamW state sharded over the ranks, GMT mask ratio 0.9 "
        "(weights: a threshold per tensor; biases: one global threshold)\n",
        version / 10000, version / 100 % 100, version % 100);
  }
  std::fflush(stdout);
  return threads_mode ? run_threads(threads, epochs) : run_nccl(ranks, rank, id_file, epochs, timeout_s);
}
