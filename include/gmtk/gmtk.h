/*
 * gmtk: gradient-mask tuning kernels.
 *
 * One Gradient-Mask Tuning (GMT) optimizer step over caller-owned tensors:
 * per tensor (or per group) find the magnitude threshold T below which a ratio
 * of the gradient entries is masked, then apply masked AdamW / Adam / SGD.
 * What a step computes is specified in docs/semantics.md; this header is the
 * whole public API. It compiles as C99 and as C++, and needs no CUDA header.
 *
 * Conventions (as in nccl.h):
 *  - Every call returns gmtkStatus_t; GMTK_SUCCESS is 0. On failure
 *    gmtkGetLastErrorMessage() names the argument that was wrong, and nothing
 *    the caller owns has been written.
 *  - Calls that launch work take the stream last. They are asynchronous with
 *    respect to the host on the CUDA backend and never synchronize it.
 *  - Config structs begin with struct_size; initialise them with the
 *    GMTK_*_INIT macros or gmtkGroupConfigInit() so that the library can grow
 *    them without breaking the ABI.
 *  - "Device memory" below means memory the handle's backend reads: CUDA
 *    device (or managed) memory on the CUDA backend, ordinary host memory on
 *    the CPU reference backend.
 */
#ifndef GMTK_GMTK_H_
#define GMTK_GMTK_H_

#include <stddef.h>
#include <stdint.h>

#define GMTK_VERSION_MAJOR 0
#define GMTK_VERSION_MINOR 2
#define GMTK_VERSION_PATCH 0
#define GMTK_VERSION_CODE(major, minor, patch) ((major) * 10000 + (minor) * 100 + (patch))
#define GMTK_VERSION GMTK_VERSION_CODE(GMTK_VERSION_MAJOR, GMTK_VERSION_MINOR, GMTK_VERSION_PATCH)

#if defined(_WIN32)
#define GMTK_API
#else
#define GMTK_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. GMTK_NUM_STATUSES is a count, not a status. */
typedef enum {
  GMTK_SUCCESS = 0,
  GMTK_ERROR_INVALID_ARGUMENT = 1,     /* a null, misaligned, overlapping or out-of-range argument */
  GMTK_ERROR_NOT_SUPPORTED = 2,        /* valid request this build or backend does not implement */
  GMTK_ERROR_INSUFFICIENT_WORKSPACE = 3,
  GMTK_ERROR_OUT_OF_MEMORY = 4,        /* host or device allocation at handle or plan creation */
  GMTK_ERROR_DEVICE_UNAVAILABLE = 5,   /* no usable CUDA device for a CUDA handle */
  GMTK_ERROR_CUDA = 6,                 /* a CUDA runtime call failed; the message has its error */
  GMTK_ERROR_INTERNAL = 7,             /* a bug in gmtk: please report the message */
  GMTK_NUM_STATUSES = 8
} gmtkStatus_t;

typedef enum {
  GMTK_BACKEND_CUDA = 0,          /* the product: fused kernels on a CUDA device */
  GMTK_BACKEND_CPU_REFERENCE = 1  /* the oracle: plain C++ on host memory, synchronous */
} gmtkBackend_t;

typedef enum { GMTK_FLOAT32 = 0, GMTK_FLOAT16 = 1, GMTK_BFLOAT16 = 2 } gmtkDtype_t;

typedef enum {
  GMTK_OPTIMIZER_ADAMW = 0, /* torch.optim.AdamW: decoupled weight decay */
  GMTK_OPTIMIZER_ADAM = 1,  /* torch.optim.Adam: L2 weight decay folded into the gradient */
  GMTK_OPTIMIZER_SGD = 2    /* torch.optim.SGD: momentum, dampening, nesterov */
} gmtkOptimizer_t;

typedef enum {
  GMTK_SCOPE_PER_TENSOR = 0, /* each tensor gets its own threshold */
  GMTK_SCOPE_GLOBAL = 1      /* one threshold over all tensors of the group */
} gmtkScope_t;

typedef enum {
  GMTK_MASK_GRAD = 0,  /* the paper's method: masked entries get gradient 0 (state decays, weight decay applies) */
  GMTK_MASK_FREEZE = 1 /* masked entries are not touched: parameter, master and state keep their bits */
} gmtkMaskMode_t;

/* Same type as cudaStream_t; NULL is the legacy default stream. */
typedef struct CUstream_st* gmtkStream_t;

typedef struct gmtkHandle* gmtkHandle_t;
typedef struct gmtkPlan* gmtkPlan_t;

/* ---- Errors and version ------------------------------------------------ */

/* Static string for a status; never NULL. */
GMTK_API const char* gmtkGetErrorString(gmtkStatus_t status);

/* Detail of the most recent failed gmtk call on the calling thread ("" if none
 * failed yet): what was wrong and which argument. Successful calls leave it as
 * it is. The pointer stays valid until the next failing call on this thread. */
GMTK_API const char* gmtkGetLastErrorMessage(void);

/* Writes GMTK_VERSION of the library that is loaded (may differ from the header's). */
GMTK_API gmtkStatus_t gmtkGetVersion(int* version);

/* ---- Handle ------------------------------------------------------------ */

typedef struct {
  size_t struct_size;    /* sizeof(gmtkHandleConfig_t) */
  gmtkBackend_t backend;
  int device;            /* CUDA device ordinal; ignored by the CPU reference backend */
} gmtkHandleConfig_t;

#define GMTK_HANDLE_CONFIG_INIT {sizeof(gmtkHandleConfig_t), GMTK_BACKEND_CUDA, 0}

/* A CUDA handle checks that the device exists and that this build carries code
 * for its architecture (else GMTK_ERROR_DEVICE_UNAVAILABLE). */
GMTK_API gmtkStatus_t gmtkHandleCreate(gmtkHandle_t* handle, const gmtkHandleConfig_t* config);
/* Plans made from the handle stay usable: handles and plans may be destroyed
 * in any order. NULL is accepted. */
GMTK_API gmtkStatus_t gmtkHandleDestroy(gmtkHandle_t handle);
GMTK_API gmtkStatus_t gmtkHandleGetBackend(gmtkHandle_t handle, gmtkBackend_t* backend);

/* ---- Parameter groups (torch param_groups) ----------------------------- */

typedef struct {
  size_t struct_size;       /* sizeof(gmtkGroupConfig_t) */
  gmtkOptimizer_t optimizer;
  double lr;                /* >= 0 */
  const float* lr_device;   /* optional: if set, the step reads lr here (device memory), e.g. for CUDA graphs */
  double weight_decay;      /* >= 0 */
  int maximize;             /* nonzero: ascend instead of descend */
  /* Adam, AdamW */
  double beta1, beta2;      /* in [0, 1) */
  double eps;               /* >= 0 */
  int amsgrad;              /* nonzero: keep max_exp_avg_sq */
  /* SGD */
  double momentum;          /* >= 0 */
  double dampening;
  int nesterov;             /* needs momentum > 0 and dampening == 0 */
  /* Gradient-mask tuning */
  double mask_ratio;        /* in [0, 1]: the fraction of entries to mask */
  gmtkScope_t scope;
  gmtkMaskMode_t mask_mode;
} gmtkGroupConfig_t;

/* Fills *config with torch.optim's defaults for the optimizer
 * (AdamW: lr 1e-3, betas 0.9/0.999, eps 1e-8, weight_decay 1e-2; Adam: the
 * same with weight_decay 0; SGD: lr 1e-3, no momentum, no weight decay), and
 * mask_ratio 0, per-tensor scope, mask-grad mode. */
GMTK_API gmtkStatus_t gmtkGroupConfigInit(gmtkGroupConfig_t* config, gmtkOptimizer_t optimizer);

/* ---- Tensors ------------------------------------------------------------ */

/* One parameter tensor, flattened. All pointers are caller-owned device memory
 * and are captured by the plan: keep them valid (and unmoved) while it lives.
 * Buffers must not overlap one another. Parameter and optimizer buffers may be
 * NULL in a plan used only for gmtkSelectThresholds / gmtkMaskGradients. */
typedef struct {
  int32_t group;            /* index into the plan's groups */
  int64_t numel;            /* entries held here; 0 is valid (a rank with no shard) */
  gmtkDtype_t grad_dtype;
  void* grad;               /* gradient as accumulated; written only by gmtkMaskGradients */
  gmtkDtype_t param_dtype;
  void* param;
  float* master_param;      /* optional fp32 master weights, only for 16-bit params */
  float* exp_avg;           /* Adam m; SGD momentum buffer (needed when momentum != 0) */
  float* exp_avg_sq;        /* Adam v */
  float* max_exp_avg_sq;    /* Adam with amsgrad only */
  /* Added in 0.2.0 (callers built against 0.1.0 pass the smaller
   * tensor_struct_size and get 0 here). A shard: this record holds entries
   * [shard_offset, shard_offset + numel) of a logical tensor of logical_numel
   * entries whose other slices the other ranks of the plan's communicator hold
   * (ZeRO / FSDP). Both 0: the record is the whole tensor. Record i of every
   * rank's plan is a slice of the same logical tensor i. Ratios, k and T are
   * the logical tensor's (or the group's logical tensors'). */
  int64_t logical_numel;
  int64_t shard_offset;
  /* Added in 0.2.0: score-based selection (SPEC section 8). If set, the mask
   * is chosen on |score| (numel entries of score_dtype, same key rules) and
   * applied to the gradient; found_inf still checks the gradient. Both
   * backends. */
  const void* score;
  gmtkDtype_t score_dtype;
} gmtkTensor_t;

/* tensor_struct_size of callers built against 0.1.0, still accepted. */
#define GMTK_TENSOR_STRUCT_SIZE_V0_1 offsetof(gmtkTensor_t, logical_numel)

/* ---- Communicators (added in 0.2.0) ---------------------------------- */

/* The ranks a sharded plan spans. gmtk keeps no global state: a communicator
 * is an object the caller creates and destroys, and each rank's plan is bound
 * to that rank's communicator. */
typedef struct gmtkComm* gmtkComm_t;

/* Creates num_ranks linked communicators for ranks that are threads of this
 * process, on the CPU reference backend: comms[r] is rank r. Each rank's
 * collective calls (gmtkPlanCreate and every call on a plan bound to it) block
 * until every rank has made the same call. For tests of a sharded layout
 * without GPUs, and the oracle of the NCCL path. */
GMTK_API gmtkStatus_t gmtkCommCreateInProcess(int num_ranks, gmtkComm_t* comms);
/* Wraps the caller's NCCL communicator (an ncclComm_t, passed as void* so that
 * this header needs no NCCL header) whose CUDA device is `device`, the device
 * of the handle the plans bound to it are made with. gmtk does not own the
 * ncclComm_t and never destroys it: destroy the gmtkComm_t (after its plans)
 * before the ncclComm_t. libnccl is found at run time: the copy this process
 * already loaded (e.g. torch's), else libnccl.so.2 on the loader's path, else
 * the file named by the environment variable GMTK_NCCL_LIBRARY. Returns
 * GMTK_ERROR_NOT_SUPPORTED where NCCL is unavailable (a build without nccl.h,
 * or no libnccl to load) and GMTK_ERROR_DEVICE_UNAVAILABLE without a usable
 * CUDA device; on failure *comm is left untouched. */
GMTK_API gmtkStatus_t gmtkCommCreateFromNccl(void* nccl_comm, int device, gmtkComm_t* comm);
GMTK_API gmtkStatus_t gmtkCommGetRank(gmtkComm_t comm, int* rank);
GMTK_API gmtkStatus_t gmtkCommGetSize(gmtkComm_t comm, int* size);
/* Payload bytes this rank has handed to collectives through `comm` so far,
 * plan creation included (an all-reduce counts its buffer, an all-gather this
 * rank's part, gradient_reduction its gradients): what docs/distributed.md's
 * table adds up to, for logging. */
GMTK_API gmtkStatus_t gmtkCommGetBytes(gmtkComm_t comm, uint64_t* bytes);
/* Destroy after every plan bound to it. NULL is accepted. */
GMTK_API gmtkStatus_t gmtkCommDestroy(gmtkComm_t comm);

/* ---- Plan --------------------------------------------------------------- */

#define GMTK_PLAN_ALLOCATE_WORKSPACE 1u /* the plan allocates its workspace once; pass NULL, 0 to the step */

typedef struct {
  size_t struct_size;          /* sizeof(gmtkPlanConfig_t) */
  const gmtkGroupConfig_t* groups;
  int32_t num_groups;          /* >= 1 */
  size_t group_struct_size;    /* sizeof(gmtkGroupConfig_t): the stride of groups[] */
  const gmtkTensor_t* tensors; /* may be NULL when num_tensors is 0 */
  int64_t num_tensors;
  size_t tensor_struct_size;   /* sizeof(gmtkTensor_t) (or GMTK_TENSOR_STRUCT_SIZE_V0_1): the stride of tensors[] */
  unsigned int flags;          /* GMTK_PLAN_* */
  /* Added in 0.2.0: the ranks over which sharded tensors' thresholds are
   * computed, or NULL. With a communicator, gmtkPlanCreate is collective: every
   * rank calls it, the ranks check that their plans agree (groups, logical
   * tensors, dtypes) and that the shards of each logical tensor tile it
   * exactly, and all fail together if not. Every call on the plan is then
   * collective too. Unsharded records in such a plan are replicas (data
   * parallel: the same gradient on every rank) and are selected locally. */
  gmtkComm_t comm;
} gmtkPlanConfig_t;

/* struct_size of callers built against 0.1.0, still accepted. */
#define GMTK_PLAN_CONFIG_STRUCT_SIZE_V0_1 offsetof(gmtkPlanConfig_t, comm)

#define GMTK_PLAN_CONFIG_INIT \
  {sizeof(gmtkPlanConfig_t), NULL, 0, sizeof(gmtkGroupConfig_t), NULL, 0, sizeof(gmtkTensor_t), 0u, NULL}

/* Validates every group and tensor and copies what it needs; the arrays may be
 * freed afterwards. On failure *plan is left untouched. */
GMTK_API gmtkStatus_t gmtkPlanCreate(gmtkHandle_t handle, const gmtkPlanConfig_t* config, gmtkPlan_t* plan);
/* NULL is accepted. */
GMTK_API gmtkStatus_t gmtkPlanDestroy(gmtkPlan_t plan);

/* Bytes of workspace the plan's calls need (0 for a plan that owns its workspace). */
GMTK_API gmtkStatus_t gmtkPlanGetWorkspaceSize(gmtkPlan_t plan, size_t* workspace_bytes);

/* The layout of a plan's mask bitmaps (gmtkStepArgs_t.mask_bits and
 * given_mask_bits): tensor i's entry j is bit j % 32 of word
 * word_offsets[i] + j / 32; each tensor starts on a word boundary; bits past
 * a tensor's entries are written 0 and ignored when read. Writes the total
 * number of 32-bit words, and, if word_offsets is not NULL, num_tensors
 * offsets. A shard's bits are its own entries'. */
GMTK_API gmtkStatus_t gmtkPlanGetMaskLayout(gmtkPlan_t plan, uint64_t* total_words, uint64_t* word_offsets);

/* Added in 0.2.0: whether the plan can take more calls (docs/errors.md).
 * *state is GMTK_SUCCESS, or GMTK_ERROR_CUDA once a call of the plan met a
 * sticky CUDA error (the context is lost: illegal address, device assert,
 * ...); every later step, selection or mask call on the plan then refuses
 * with that status and the first failure's message, and the plan should be
 * destroyed. A failed call
 * that was not sticky (a refused argument, a launch error that cleared)
 * leaves the plan usable. */
GMTK_API gmtkStatus_t gmtkPlanGetState(gmtkPlan_t plan, gmtkStatus_t* state);

/* Changes a group's schedule between steps without rebuilding the plan:
 * lr, lr_device, weight_decay, maximize, betas, eps, momentum, dampening,
 * nesterov and mask_ratio may change; optimizer, amsgrad, scope and mask_mode
 * may not (they decide which buffers and workspace the plan needs). */
GMTK_API gmtkStatus_t gmtkPlanSetGroupHyperparams(gmtkPlan_t plan, int32_t group, const gmtkGroupConfig_t* config);

/* ---- Steps ---------------------------------------------------------------- */

/* What a call does to replica gradients first (gmtkStepArgs_t.gradient_reduction). */
typedef enum {
  GMTK_GRADIENTS_AS_GIVEN = 0, /* used as they are */
  GMTK_GRADIENTS_SUM = 1,      /* replaced by their sum over the ranks */
  GMTK_GRADIENTS_AVERAGE = 2   /* replaced by their mean over the ranks */
} gmtkGradientReduction_t;

typedef struct {
  size_t struct_size;           /* sizeof(gmtkStepArgs_t) */
  int64_t step;                 /* 1-based index of this update (bias correction, SGD's first step);
                                   used when step_count is NULL */
  int64_t* step_count;          /* optional device counter of completed steps (torch's state "step"):
                                   the step uses t = *step_count + 1 and stores t if it applies */
  const float* inv_loss_scale;  /* optional device scalar: gradients are multiplied by it before use */
  float* found_inf;             /* optional device output: 1.0f if any (unscaled) gradient is inf/NaN, else 0.0f */
  float* thresholds;            /* optional device output, num_tensors floats: T of each tensor's set */
  int64_t* kept_counts;         /* optional device output, num_tensors: entries with |g| >= T in each tensor */
  /* Added in 0.2.0: data parallel. With a communicator, the gradients of the
   * plan's replica records (unsharded: the same tensor on every rank) are first
   * summed or averaged over the ranks, in place, as DDP's all-reduce would
   * (one batched NCCL all-reduce on the stream); shards are left as they are.
   * Argument checks come first; a failure after the reduction (a collective
   * or a launch) leaves the reduced gradients behind. */
  gmtkGradientReduction_t gradient_reduction;
  /* Added in 0.2.0: mask schedules (docs/semantics.md, "Mask schedules"),
   * on both backends. At most one of the two inputs; with either, nothing is
   * selected. On a sharded plan every rank must make the same choice. */
  const float* given_thresholds;   /* optional device input, num_tensors floats: tensor i keeps |g| >= T_i */
  const uint32_t* given_mask_bits; /* optional device input: keeps exactly the set bits (gmtkPlanGetMaskLayout) */
  uint32_t* mask_bits;             /* optional device output: the call's kept-mask, 1 bit per entry, same layout */
} gmtkStepArgs_t;

/* struct_size of callers built against 0.1.0, still accepted. */
#define GMTK_STEP_ARGS_STRUCT_SIZE_V0_1 offsetof(gmtkStepArgs_t, gradient_reduction)

#define GMTK_STEP_ARGS_INIT \
  {sizeof(gmtkStepArgs_t), 1, NULL, NULL, NULL, NULL, NULL, GMTK_GRADIENTS_AS_GIVEN, NULL, NULL, NULL}

/* The full GMT step: select thresholds, then apply the masked optimizer update
 * to every tensor. If any gradient is not finite, only the outputs are written
 * (found_inf = 1) and no tensor or counter changes. */
GMTK_API gmtkStatus_t gmtkStep(gmtkPlan_t plan, const gmtkStepArgs_t* args, void* workspace,
                               size_t workspace_bytes, gmtkStream_t stream);

/* Selection only: writes thresholds, kept_counts and found_inf; touches no tensor
 * (but replica gradients, when args->gradient_reduction asks for their reduction). */
GMTK_API gmtkStatus_t gmtkSelectThresholds(gmtkPlan_t plan, const gmtkStepArgs_t* args, void* workspace,
                                           size_t workspace_bytes, gmtkStream_t stream);

/* Mask only: sets to +0 every gradient entry with |g| < T, in place, for
 * frameworks that run their own optimizer. Writes the same outputs as
 * gmtkSelectThresholds. If any gradient is not finite the gradients are left
 * as they are (so the caller's own inf check still fires). */
GMTK_API gmtkStatus_t gmtkMaskGradients(gmtkPlan_t plan, const gmtkStepArgs_t* args, void* workspace,
                                        size_t workspace_bytes, gmtkStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* GMTK_GMTK_H_ */
