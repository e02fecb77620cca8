// A small trainer whose optimizer steps go through gmtk's C API.
//
// It generates a 4-class data set from a random "teacher" network, trains a
// 16-64-4 MLP (tanh, softmax cross-entropy) on it with masked AdamW, and prints
// the loss per epoch for mask ratios 0, 0.5 and 0.9. Forward and backward run
// on the host; the optimizer step runs on the CUDA backend when it can, else on
// the CPU reference backend (--backend=cpu|cuda|auto, default auto).
// --refresh-every=N selects the mask every N steps only and keeps it fixed in
// between (given as a bitmap: docs/semantics.md, "Mask schedules"), printing
// how much of each new mask overlaps the previous one. In auto
// mode it says why it falls back: no usable CUDA device, or a first step that
// the CUDA backend refused (for example a device this build has no code for).
#include <gmtk/gmtk.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int kInputs = 16;
constexpr int kHidden = 64;
constexpr int kClasses = 4;
constexpr int kSamples = 4096;
constexpr int kBatch = 256;

struct DataSet {
  std::vector<float> x;  // kSamples x kInputs
  std::vector<int> label;
};

// A random tanh network whose argmax labels the data: learnable, but not
// linearly separable.
struct Teacher {
  std::vector<float> w1, w2;
  explicit Teacher(std::mt19937& rng) : w1(kHidden * kInputs), w2(kClasses * kHidden) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& w : w1) w = 2.0f * normal(rng) / std::sqrt(static_cast<float>(kInputs));
    for (float& w : w2) w = normal(rng) / std::sqrt(static_cast<float>(kHidden));
  }
  int label(const float* x) const {
    float hidden[kHidden];
    for (int h = 0; h < kHidden; ++h) {
      float sum = 0;
      for (int i = 0; i < kInputs; ++i) sum += w1[h * kInputs + i] * x[i];
      hidden[h] = std::tanh(sum);
    }
    int best = 0;
    float best_score = -1e30f;
    for (int c = 0; c < kClasses; ++c) {
      float score = 0;
      for (int h = 0; h < kHidden; ++h) score += w2[c * kHidden + h] * hidden[h];
      if (score > best_score) best_score = score, best = c;
    }
    return best;
  }
};

DataSet make_data(const Teacher& teacher, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  DataSet data{std::vector<float>(kSamples * kInputs), std::vector<int>(kSamples)};
  for (int s = 0; s < kSamples; ++s) {
    float* x = &data.x[s * kInputs];
    for (int i = 0; i < kInputs; ++i) x[i] = normal(rng);
    data.label[s] = teacher.label(x);
  }
  return data;
}

// The four parameter tensors of the MLP, in one place so that gmtk can see them.
enum Tensor { kW1, kB1, kW2, kB2, kTensorCount };
const int kNumel[kTensorCount] = {kHidden * kInputs, kHidden, kClasses * kHidden, kClasses};

struct Mlp {
  std::vector<float> param[kTensorCount];
  std::vector<float> grad[kTensorCount];

  explicit Mlp(std::mt19937& rng) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int t = 0; t < kTensorCount; ++t) {
      param[t].assign(kNumel[t], 0.0f);
      grad[t].assign(kNumel[t], 0.0f);
    }
    for (float& w : param[kW1]) w = normal(rng) / std::sqrt(static_cast<float>(kInputs));
    for (float& w : param[kW2]) w = normal(rng) / std::sqrt(static_cast<float>(kHidden));
  }

  // Mean cross-entropy over samples [first, first + count); accumulates the
  // averaged gradients into grad[] when `backward`.
  double loss(const DataSet& data, int first, int count, bool backward) {
    if (backward) {
      for (auto& g : grad) std::fill(g.begin(), g.end(), 0.0f);
    }
    double total = 0;
    const float scale = 1.0f / static_cast<float>(count);
    for (int s = first; s < first + count; ++s) {
      const float* x = &data.x[s * kInputs];
      float hidden[kHidden], logits[kClasses];
      for (int h = 0; h < kHidden; ++h) {
        float sum = param[kB1][h];
        for (int i = 0; i < kInputs; ++i) sum += param[kW1][h * kInputs + i] * x[i];
        hidden[h] = std::tanh(sum);
      }
      float max_logit = -1e30f;
      for (int c = 0; c < kClasses; ++c) {
        float sum = param[kB2][c];
        for (int h = 0; h < kHidden; ++h) sum += param[kW2][c * kHidden + h] * hidden[h];
        logits[c] = sum;
        max_logit = std::max(max_logit, sum);
      }
      float normaliser = 0;
      for (float z : logits) normaliser += std::exp(z - max_logit);
      const int y = data.label[s];
      total += -(logits[y] - max_logit - std::log(normaliser));
      if (!backward) continue;
      float dlogits[kClasses];
      for (int c = 0; c < kClasses; ++c) {
        dlogits[c] = (std::exp(logits[c] - max_logit) / normaliser - (c == y ? 1.0f : 0.0f)) * scale;
      }
      float dhidden[kHidden] = {};
      for (int c = 0; c < kClasses; ++c) {
        grad[kB2][c] += dlogits[c];
        for (int h = 0; h < kHidden; ++h) {
          grad[kW2][c * kHidden + h] += dlogits[c] * hidden[h];
          dhidden[h] += param[kW2][c * kHidden + h] * dlogits[c];
        }
      }
      for (int h = 0; h < kHidden; ++h) {
        const float dpre = dhidden[h] * (1.0f - hidden[h] * hidden[h]);
        grad[kB1][h] += dpre;
        for (int i = 0; i < kInputs; ++i) grad[kW1][h * kInputs + i] += dpre * x[i];
      }
    }
    return total / count;
  }
};

#define CUDA_OR_RETURN(call)                                                                          \
  do {                                                                                                \
    const cudaError_t error_ = (call);                                                                \
    if (error_ != cudaSuccess) {                                                                      \
      std::snprintf(error, sizeof(error), "%s: %s", #call, cudaGetErrorString(error_));              \
      return false;                                                                                   \
    }                                                                                                 \
  } while (0)

#define GMTK_OR_RETURN(call)                                                                          \
  do {                                                                                                \
    const gmtkStatus_t status_ = (call);                                                              \
    if (status_ != GMTK_SUCCESS) {                                                                    \
      std::snprintf(error, sizeof(error), "%s: %s", gmtkGetErrorString(status_), gmtkGetLastErrorMessage()); \
      return false;                                                                                   \
    }                                                                                                 \
  } while (0)

// gmtk as this trainer's optimizer: two AdamW groups (weights with weight
// decay, biases without), one plan, a step per batch. On the CUDA backend the
// parameters, gradients and state live in device memory and the host copies
// go back and forth around each step; on the CPU backend gmtk works on the
// model's own arrays.
class GmtkOptimizer {
 public:
  char error[1024] = "";

  bool init(gmtkBackend_t backend, Mlp& model, double mask_ratio, int refresh_every) {
    backend_ = backend;
    refresh_every_ = refresh_every;
    gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
    handle_config.backend = backend;
    GMTK_OR_RETURN(gmtkHandleCreate(&handle_, &handle_config));

    gmtkGroupConfig_t groups[2];
    for (gmtkGroupConfig_t& g : groups) {
      gmtkGroupConfigInit(&g, GMTK_OPTIMIZER_ADAMW);
      g.lr = 3e-3;
      g.mask_ratio = mask_ratio;
    }
    groups[1].weight_decay = 0.0;

    gmtkTensor_t tensors[kTensorCount];
    for (int t = 0; t < kTensorCount; ++t) {
      const size_t bytes = kNumel[t] * sizeof(float);
      if (backend == GMTK_BACKEND_CUDA) {
        for (void** p : {&device_param_[t], &device_grad_[t], &device_m_[t], &device_v_[t]}) {
          CUDA_OR_RETURN(cudaMalloc(p, bytes));
          CUDA_OR_RETURN(cudaMemset(*p, 0, bytes));
        }
        CUDA_OR_RETURN(cudaMemcpy(device_param_[t], model.param[t].data(), bytes, cudaMemcpyHostToDevice));
      } else {
        host_m_[t].assign(kNumel[t], 0.0f);
        host_v_[t].assign(kNumel[t], 0.0f);
      }
      gmtkTensor_t& d = tensors[t];
      std::memset(&d, 0, sizeof(d));
      d.group = (t == kW1 || t == kW2) ? 0 : 1;
      d.numel = kNumel[t];
      d.grad_dtype = d.param_dtype = GMTK_FLOAT32;
      const bool cuda = backend == GMTK_BACKEND_CUDA;
      d.grad = cuda ? device_grad_[t] : model.grad[t].data();
      d.param = cuda ? device_param_[t] : model.param[t].data();
      d.exp_avg = cuda ? static_cast<float*>(device_m_[t]) : host_m_[t].data();
      d.exp_avg_sq = cuda ? static_cast<float*>(device_v_[t]) : host_v_[t].data();
    }
    gmtkPlanConfig_t plan_config = GMTK_PLAN_CONFIG_INIT;
    plan_config.groups = groups;
    plan_config.num_groups = 2;
    plan_config.tensors = tensors;
    plan_config.num_tensors = kTensorCount;
    plan_config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
    GMTK_OR_RETURN(gmtkPlanCreate(handle_, &plan_config, &plan_));
    if (backend == GMTK_BACKEND_CUDA) CUDA_OR_RETURN(cudaMalloc(&device_kept_, kTensorCount * sizeof(int64_t)));
    uint64_t words = 0;
    GMTK_OR_RETURN(gmtkPlanGetMaskLayout(plan_, &words, nullptr));
    bits_.assign(words, 0u);
    if (backend == GMTK_BACKEND_CUDA) CUDA_OR_RETURN(cudaMalloc(&device_bits_, words * sizeof(uint32_t)));
    return true;
  }

  // With --refresh-every: the share of the previous mask's kept entries that
  // the newest one keeps too (NaN until two masks exist).
  double last_overlap = NAN;
  bool refreshed = false;

  // Which mask this step uses: selected (and written to the bitmap) on a
  // refresh, else the bitmap given back.
  void choose_mask(int64_t step_index, gmtkStepArgs_t* args) {
    refreshed = false;
    if (refresh_every_ <= 0) return;
    uint32_t* bits = backend_ == GMTK_BACKEND_CUDA ? static_cast<uint32_t*>(device_bits_) : bits_.data();
    if ((step_index - 1) % refresh_every_ == 0) {
      args->mask_bits = bits;
      refreshed = true;
    } else {
      args->given_mask_bits = bits;
    }
  }

  // After a refresh: the overlap with the mask before it.
  void compare_masks() {
    if (!refreshed) return;
    if (!previous_bits_.empty()) {
      int64_t before = 0, both = 0;
      for (size_t w = 0; w < bits_.size(); ++w) {
        before += __builtin_popcount(previous_bits_[w]);
        both += __builtin_popcount(previous_bits_[w] & bits_[w]);
      }
      last_overlap = before > 0 ? static_cast<double>(both) / static_cast<double>(before) : NAN;
    }
    previous_bits_ = bits_;
  }

  // One optimizer step; `kept` gets the entries each tensor kept.
  bool step(Mlp& model, int64_t step_index, int64_t kept[kTensorCount]) {
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step = step_index;
    choose_mask(step_index, &args);
    if (backend_ == GMTK_BACKEND_CUDA) {
      for (int t = 0; t < kTensorCount; ++t) {
        CUDA_OR_RETURN(
            cudaMemcpy(device_grad_[t], model.grad[t].data(), kNumel[t] * sizeof(float), cudaMemcpyHostToDevice));
      }
      args.kept_counts = static_cast<int64_t*>(device_kept_);
      GMTK_OR_RETURN(gmtkStep(plan_, &args, nullptr, 0, nullptr));
      // The copies wait for the step (same stream); an error of its kernels surfaces here.
      for (int t = 0; t < kTensorCount; ++t) {
        CUDA_OR_RETURN(
            cudaMemcpy(model.param[t].data(), device_param_[t], kNumel[t] * sizeof(float), cudaMemcpyDeviceToHost));
      }
      CUDA_OR_RETURN(cudaMemcpy(kept, device_kept_, kTensorCount * sizeof(int64_t), cudaMemcpyDeviceToHost));
      if (refreshed) {
        CUDA_OR_RETURN(
            cudaMemcpy(bits_.data(), device_bits_, bits_.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost));
      }
    } else {
      args.kept_counts = kept;
      GMTK_OR_RETURN(gmtkStep(plan_, &args, nullptr, 0, nullptr));
    }
    compare_masks();
    return true;
  }

  ~GmtkOptimizer() {
    gmtkPlanDestroy(plan_);
    gmtkHandleDestroy(handle_);
    for (int t = 0; t < kTensorCount; ++t) {
      for (void* p : {device_param_[t], device_grad_[t], device_m_[t], device_v_[t]}) cudaFree(p);
    }
    cudaFree(device_kept_);
    cudaFree(device_bits_);
  }

 private:
  gmtkBackend_t backend_ = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle_ = nullptr;
  gmtkPlan_t plan_ = nullptr;
  void* device_param_[kTensorCount] = {};
  void* device_grad_[kTensorCount] = {};
  void* device_m_[kTensorCount] = {};
  void* device_v_[kTensorCount] = {};
  void* device_kept_ = nullptr;
  void* device_bits_ = nullptr;
  int refresh_every_ = 0;
  std::vector<uint32_t> bits_, previous_bits_;  // host copies of the newest and the previous mask
  std::vector<float> host_m_[kTensorCount], host_v_[kTensorCount];
};

// Trains one model at one mask ratio; false, with the reason, if the backend
// could not be set up or refused the first step (nothing printed then).
bool train(gmtkBackend_t backend, double mask_ratio, int epochs, int refresh_every, const DataSet& train_set,
           const DataSet& test_set, std::string* why_not) {
  std::mt19937 rng(7);  // the same initial model for every ratio
  Mlp model(rng);
  GmtkOptimizer optimizer;
  if (!optimizer.init(backend, model, mask_ratio, refresh_every)) {
    *why_not = optimizer.error;
    return false;
  }
  int64_t step = 0;
  const int total = kNumel[kW1] + kNumel[kB1] + kNumel[kW2] + kNumel[kB2];
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    double epoch_loss = 0;
    int64_t kept_sum = 0;
    int batches = 0;
    double overlap_sum = 0;
    int overlaps = 0;
    for (int first = 0; first < kSamples; first += kBatch, ++batches) {
      epoch_loss += model.loss(train_set, first, kBatch, true);
      int64_t kept[kTensorCount] = {};
      if (!optimizer.step(model, ++step, kept)) {
        if (step == 1) {  // the backend cannot step at all: let the caller fall back
          *why_not = optimizer.error;
          return false;
        }
        std::fprintf(stderr, "gmtk step failed: %s\n", optimizer.error);
        std::exit(1);
      }
      if (step == 1) {  // the backend runs: from here on, it is this run's
        std::printf("\nmask ratio %.1f (%s backend)\n", mask_ratio,
                    backend == GMTK_BACKEND_CUDA ? "CUDA" : "CPU reference");
        std::printf("  epoch  train loss  test loss  kept entries%s\n",
                    refresh_every > 0 ? "  overlap of consecutive masks" : "");
      }
      for (int64_t k : kept) kept_sum += k;
      if (optimizer.refreshed && !std::isnan(optimizer.last_overlap)) {
        overlap_sum += optimizer.last_overlap;
        ++overlaps;
      }
    }
    const double test_loss = model.loss(test_set, 0, kSamples, false);
    std::printf("  %5d  %10.4f  %9.4f  %5.1f%%", epoch, epoch_loss / batches, test_loss,
                100.0 * static_cast<double>(kept_sum) / (static_cast<double>(batches) * total));
    if (refresh_every > 0 && overlaps > 0) std::printf("  %5.1f%%", 100.0 * overlap_sum / overlaps);
    std::printf("\n");
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string backend_choice = "auto";
  int epochs = 8;
  int refresh_every = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--backend=", 10) == 0) {
      backend_choice = argv[i] + 10;
    } else if (std::strncmp(argv[i], "--epochs=", 9) == 0) {
      epochs = std::atoi(argv[i] + 9);
    } else if (std::strncmp(argv[i], "--refresh-every=", 16) == 0) {
      refresh_every = std::atoi(argv[i] + 16);
    } else if (std::strcmp(argv[i], "--refresh-every") == 0 && i + 1 < argc) {
      refresh_every = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--backend=auto|cuda|cpu] [--epochs=N] [--refresh-every=N]\n", argv[0]);
      return 2;
    }
  }
  std::mt19937 rng(2024);
  const Teacher teacher(rng);
  const DataSet train_set = make_data(teacher, rng);
  const DataSet test_set = make_data(teacher, rng);
  int version = 0;
  gmtkGetVersion(&version);
  std::printf("gmtk %d.%d.%d: a 16-64-4 MLP on %d generated samples, AdamW with gradient masking\n", version / 10000,
              version / 100 % 100, version % 100, kSamples);

  bool try_cuda = backend_choice != "cpu";
  for (double ratio : {0.0, 0.5, 0.9}) {
    std::string why_not;
    if (try_cuda && train(GMTK_BACKEND_CUDA, ratio, epochs, refresh_every, train_set, test_set, &why_not)) continue;
    if (backend_choice == "cuda") {
      std::fprintf(stderr, "the CUDA backend cannot run this: %s\n", why_not.c_str());
      return 1;
    }
    if (try_cuda) {  // said once: the same reason holds for the other ratios
      std::printf("(CUDA backend not used: %s; falling back to the CPU reference backend)\n", why_not.c_str());
      try_cuda = false;
    }
    if (!train(GMTK_BACKEND_CPU_REFERENCE, ratio, epochs, refresh_every, train_set, test_set, &why_not)) {
      std::fprintf(stderr, "the CPU reference backend failed: %s\n", why_not.c_str());
      return 1;
    }
  }
  return 0;
}
