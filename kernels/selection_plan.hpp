// What the CUDA selection engine knows of a plan, built once at
// gmtkPlanCreate: the selection sets, the tensor and chunk tables the kernels
// read from plan-owned device memory, and the layout of a call's workspace.
// Plain C++ (no CUDA): the CUDA backend uploads these tables, and
// tests/host_schedule/ runs the same schedule over the same tables and layout.
#pragma once

#include <gmtk/gmtk.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "selection_logic.hpp"

namespace gmtk::kernels {

// Sizes that shape the schedule. The defaults are the product's; the host
// schedule test also runs tiny ones so that every path (large sets, several
// chunks per set, candidate overflow) shows up at small sizes.
struct SelectionTuning {
  uint64_t chunk_entries = uint64_t{1} << 16;         // a multiple of 8 (the 16-byte vector of 16-bit entries),
                                                      // at most 2^16 (a deferred entry's position keeps 16 bits of it)
  uint64_t small_set_limit_fp32 = uint64_t{1} << 18;  // fp32 sets below this run on one block
  uint64_t small_set_limit_16bit = uint64_t{1} << 21; // fp16/bf16 sets below this run on one block
  uint64_t candidate_share = 32;                      // a large fp32 set may gather n / 32 candidate keys
  uint64_t min_candidates = 4096;                     // ... and at least this many
  uint32_t sample_entries = 1024;                     // a large set's sample: the first entries of each chunk
  uint64_t deferral_share = 128;                      // a step may defer n / 128 entries of a large fp32 set
  uint64_t min_deferrals = 1024;                      // ... and at least this many
};

// The device tables. Records are plain structs of fixed layout.
struct TensorRecord {
  uint64_t grad;              // address of the gradient
  uint64_t numel;             // entries here
  uint64_t logical_numel;     // entries of the logical tensor (a shard's, over all ranks; else numel)
  uint64_t keys;              // address of what the mask is chosen on: the score, else the gradient
  uint64_t mask_word_offset;  // its first word in a bitmap (gmtkPlanGetMaskLayout)
  uint32_t set;
  uint32_t dtype;             // the gradient's GradDtype
  uint32_t key_dtype;         // the keys' (the set's dtype)
  uint32_t padding;
};

struct SetRecord {
  uint64_t numel;               // entries of the set here (all its tensors)
  uint64_t logical_numel;       // entries of the set over all ranks (sharded sets; else numel): k's n
  uint64_t histogram_offset;    // first counter of its histogram (large sets)
  uint64_t candidate_offset;    // first key of its candidate region (large fp32 sets)
  uint64_t candidate_capacity;  // keys its region holds (0: none)
  uint64_t deferral_offset;     // first position of its deferral region (large fp32 sets)
  uint64_t deferral_capacity;   // entries a step may defer (<= candidate_capacity; 0: none)
  uint32_t group;
  uint32_t dtype;
  uint32_t large;               // 1: multi-block passes A/B/C; 0: the one-block path
  uint32_t first_member;        // into the member list: the set's tensors
  uint32_t member_count;
  uint32_t chunk_count;         // chunks of the set (large sets)
  uint32_t sharded;             // its tensors are shards: histograms summed over the ranks, no candidates or deferral
  uint32_t counts_here;         // this rank's keys enter the set's histograms: a shard's always, a replica's
                                // on rank 0 only (every rank holds the same entries; the sum is then rank 0's)
  uint32_t scored;              // a member selects on a score: the update never defers the set's boundary bin
  uint32_t padding;
};

struct ChunkRecord {
  uint64_t begin;    // first entry, in the tensor
  uint32_t length;   // entries
  uint32_t tensor;
  uint32_t set;
  uint32_t ordinal;  // index among its set's chunks
};

struct SelectionTables {
  std::vector<TensorRecord> tensors;
  std::vector<SetRecord> sets;
  std::vector<uint32_t> members;      // tensor indexes, set by set
  std::vector<ChunkRecord> chunks;    // large fp32 sets' chunks, then large 16-bit sets', then the rest
  std::vector<uint32_t> large_sets;   // set indexes
  std::vector<uint32_t> small_sets;
  uint64_t large_fp32_chunks = 0;     // chunks [0, large_fp32_chunks) are large fp32 sets'
  uint32_t large_fp32_sets = 0;       // (a rank may hold no chunk of a sharded one: the schedule asks this)
  bool sharded = false;               // some set is sharded: the plan has a communicator
  uint64_t large_chunks = 0;          // chunks [0, large_chunks) are large sets'
  uint32_t sample_entries = 0;        // SelectionTuning::sample_entries
  uint64_t histogram_counters = 0;    // 64-bit counters, all large sets (kHistogramSlots each)
  uint64_t candidate_keys = 0;        // 32-bit keys, all large fp32 sets
  uint64_t deferral_slots = 0;        // 64-bit positions of deferred entries, all large fp32 sets
  bool has_multi_tensor_sets = false; // a global set of several tensors: its per-tensor kept counts need a count
  uint64_t mask_words = 0;            // 32-bit words of a bitmap of every tensor (gmtkPlanGetMaskLayout)
};

// Builds the tables of a validated plan: one set per tensor of a per-tensor
// group, one per global group (a global group without tensors has none).
// `rank`: this rank's in the plan's communicator (0 without one). Every rank's
// tables have the same sets, large or small alike, and the same workspace
// layout; only the chunks (this rank's entries) differ.
SelectionTables build_selection_tables(const std::vector<gmtkGroupConfig_t>& groups,
                                       const std::vector<gmtkTensor_t>& tensors, const SelectionTuning& tuning,
                                       int rank = 0);

// The workspace of a call, carved at 256-byte alignment (host/workspace.hpp).
// Everything before `zeroed_bytes` is cleared by the call's first operation;
// the candidate keys are written before they are read.
struct SelectionWorkspace {
  size_t set_states;    // SetState per set
  size_t histograms;    // unsigned long long per histogram counter
  size_t tensor_kept;   // unsigned long long per tensor: counts of multi-tensor sets' members, or of a given input's
  size_t flags;         // uint32_t: [0] found a non-finite gradient
  size_t zeroed_bytes;
  size_t candidates;    // uint32_t per candidate key
  size_t deferrals;     // uint64_t per deferral slot: a deferred entry's chunk << 16 | entry in chunk
  size_t required_bytes;
};

SelectionWorkspace selection_workspace(const SelectionTables& tables);

// Groups a CUDA plan may have: their mask ratios travel by value in every
// launch's parameters (so a ratio change needs no upload, and a captured
// graph keeps the ratios it was captured with).
constexpr int kMaxGroupsOnCuda = 256;

// The parameters of every selection kernel, by value: where the tables, the
// workspace and the caller's outputs are, and the group ratios of this call.
struct SelectionLaunch {
  const TensorRecord* tensors;
  const SetRecord* sets;
  const uint32_t* members;
  const ChunkRecord* chunks;
  const uint32_t* large_sets;
  const uint32_t* small_sets;
  SetState* states;
  unsigned long long* histograms;
  unsigned long long* tensor_kept;
  uint32_t* flags;       // [0]: a gradient is not finite
  uint32_t* candidates;
  unsigned long long* deferred_positions;
  const float* inv_loss_scale;  // NULL: no unscaling
  float* thresholds;            // caller outputs, each optional
  int64_t* kept_counts;
  float* found_inf;
  int64_t* step_count;          // gmtkStep's device counter: advanced by the outputs launch unless found_inf
  const float* given_thresholds;    // mask_source given_thresholds: one per tensor
  const uint32_t* given_mask_bits;  // mask_source given_bits: the plan's bitmap layout
  uint32_t* mask_bits;              // NULL, or the call's kept-mask out (cleared first, then ORed into)
  uint64_t mask_words;              // words of the bitmap layout
  uint64_t chunk_count;
  uint64_t large_chunks;
  uint32_t tensor_count;
  uint32_t large_set_count;
  uint32_t small_set_count;
  uint32_t sample_entries;         // SelectionTuning::sample_entries
  uint32_t check_non_finite;       // pass A evaluates found_inf's rule on every chunk
  uint32_t zero_masked;            // the apply pass writes +0 over masked gradients (gmtkMaskGradients)
  uint32_t count_kept_per_tensor;  // the apply pass counts kept entries of multi-tensor sets, per tensor
  uint32_t may_defer;              // gmtkStep: boundary bins may be deferred to the update (advance_selection)
  uint32_t mask_source;            // MaskSource: selected, or a given input (nothing is selected)
  double mask_ratio[kMaxGroupsOnCuda];
};

// Where a call's mask comes from (SPEC section 8).
enum class MaskSource : uint32_t { selected = 0, given_thresholds = 1, given_bits = 2 };

// The three calls of the API, as the engine runs them.
enum class EngineCall { select_thresholds, mask_gradients, step };

// What one call asks of the engine.
struct SelectionRequest {
  bool mask_gradients;     // gmtkMaskGradients: zero the masked entries
  bool step;               // gmtkStep: found_inf always evaluated, then the fused update
  bool wants_found_inf;    // args->found_inf is set
  bool wants_kept_counts;  // args->kept_counts is set
  bool any_masking;        // some group's ratio is above 0 (else every set keeps all: no selection work)
  bool sharded;            // the plan's histograms, found_inf and per-tensor counts are summed over ranks:
                           // every rank then makes the same passes, whatever its own arguments ask
  bool given;              // given thresholds or a given bitmap decide the mask: nothing is selected
  bool write_mask_bits;    // args->mask_bits is set
};

// Which launches a call makes, decided on the host from the tables and the
// request alone (no device state): at most 18, whatever the tensor count.
struct SelectionSchedule {
  bool check_non_finite;
  bool sample;                // the sample pass of the large sets and its scan (their windows)
  bool pass_a;                // level 0 of the large sets, found_inf for every chunk
  uint64_t pass_a_chunks;     // chunks [0, pass_a_chunks)
  bool large_scan;            // level 0's scan of the large sets
  int level_passes;           // further level passes over the large sets' chunks, each with its scan:
                              // 3 with large fp32 sets (the no-window fallback's 3 levels), 2 with only 16-bit ones
  bool small_sets;            // the one-block selection of small sets
  bool apply;                 // the mask / count / bitmap pass
  bool zero_masked;
  bool count_kept_per_tensor;  // of multi-tensor sets' members, or of every tensor under a given input
  bool write_mask_bits;        // the bitmap is cleared (a memset) and the apply pass ORs the kept bits in
  bool update;                // gmtkStep's fused update (step_kernels.cu), after selection
  bool deferred;              // after the update: the deferred entries' level pass, its scan, and their finish
  bool exchange;              // sharded: each histogram pass's counters (pass A's found_inf flag, the apply
                              // pass's per-tensor counts) are summed over the ranks before they are read

  // Kernel launches plus the workspace memset.
  int launches() const {
    return 2 + (write_mask_bits ? 1 : 0) + (sample ? 2 : 0) + (pass_a ? 1 : 0) + (large_scan ? 1 : 0) + 2 * level_passes + (small_sets ? 1 : 0) +
           (apply ? 1 : 0) + (update ? 1 : 0) + (deferred ? 3 : 0);
  }
};

SelectionSchedule selection_schedule(const SelectionTables& tables, const SelectionRequest& request);

// The fields of `launch` that come from the tables' sizes (once per plan).
void bind_table_sizes(const SelectionTables& tables, SelectionLaunch* launch);

// The fields of `launch` that change per call (workspace, outputs, ratios,
// schedule flags), and the call's schedule. `workspace_base` is the aligned
// base of the call's workspace; `groups` are the plan's groups as they are now.
SelectionSchedule bind_call(const SelectionTables& tables, const SelectionWorkspace& layout,
                            unsigned char* workspace_base, const std::vector<gmtkGroupConfig_t>& groups,
                            const gmtkStepArgs_t& args, EngineCall call, SelectionLaunch* launch);

// Where a sharded call sums workspace counters over the ranks (the schedule's
// `exchange`): after the sample pass, pass A, each level pass and the
// deferred level pass, the histograms (after pass A with the found_inf flag);
// after the apply pass, the per-tensor kept counts.
enum class ExchangePoint { sample, level_0, level, deferred, apply };

struct ExchangeSpan {
  unsigned long long* values;
  uint64_t count;
};

// What to sum at `point`: one or two spans of 64-bit counters (count 0: none).
struct ExchangeSpans {
  ExchangeSpan span[2];
};
ExchangeSpans exchange_spans(const SelectionTables& tables, const SelectionSchedule& schedule,
                             const SelectionLaunch& launch, ExchangePoint point);

}  // namespace gmtk::kernels
