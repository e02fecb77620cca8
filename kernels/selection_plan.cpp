#include "selection_plan.hpp"

#include <algorithm>

#include "../host/workspace.hpp"

namespace gmtk::kernels {
namespace {

// A sharded set is always large: the one-block path has no point between its
// passes where the ranks could sum their histograms.
bool is_large(const SetRecord& set, const SelectionTuning& tuning) {
  const uint64_t limit = set.dtype == kFloat32 ? tuning.small_set_limit_fp32 : tuning.small_set_limit_16bit;
  return set.sharded || set.numel >= limit;
}

bool is_shard(const gmtkTensor_t& tensor) { return tensor.logical_numel != 0 || tensor.shard_offset != 0; }

void append_chunks(const SelectionTables& tables, uint32_t set_index, uint64_t chunk_entries,
                   std::vector<ChunkRecord>* chunks) {
  const SetRecord& set = tables.sets[set_index];
  uint32_t ordinal = 0;
  for (uint32_t m = 0; m < set.member_count; ++m) {
    const uint32_t tensor = tables.members[set.first_member + m];
    const uint64_t numel = tables.tensors[tensor].numel;
    for (uint64_t begin = 0; begin < numel; begin += chunk_entries) {
      const auto length = static_cast<uint32_t>(std::min(chunk_entries, numel - begin));
      chunks->push_back(ChunkRecord{begin, length, tensor, set_index, ordinal++});
    }
  }
}

}  // namespace

SelectionTables build_selection_tables(const std::vector<gmtkGroupConfig_t>& groups,
                                       const std::vector<gmtkTensor_t>& tensors, const SelectionTuning& tuning,
                                       int rank) {
  SelectionTables tables;
  tables.sample_entries = tuning.sample_entries;
  tables.tensors.resize(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const gmtkTensor_t& tensor = tensors[t];
    TensorRecord& record = tables.tensors[t];
    record = TensorRecord{};
    record.grad = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(tensor.grad));
    record.numel = static_cast<uint64_t>(tensor.numel);
    record.logical_numel = is_shard(tensor) ? static_cast<uint64_t>(tensor.logical_numel) : record.numel;
    record.dtype = static_cast<uint32_t>(tensor.grad_dtype);
    // The mask is chosen on the score when there is one (SPEC section 8).
    const bool scored = tensor.score != nullptr;
    record.keys = scored ? static_cast<uint64_t>(reinterpret_cast<uintptr_t>(tensor.score)) : record.grad;
    record.key_dtype = scored ? static_cast<uint32_t>(tensor.score_dtype) : record.dtype;
    // The bitmap layout of plan.hpp: each tensor from a word boundary, in plan order.
    record.mask_word_offset = tables.mask_words;
    tables.mask_words += (record.numel + 31) / 32;
  }

  // Sets, group by group, in tensor order within a group.
  std::vector<std::vector<uint32_t>> members_of_group(groups.size());
  for (size_t t = 0; t < tensors.size(); ++t) members_of_group[tensors[t].group].push_back(static_cast<uint32_t>(t));
  auto add_set = [&](uint32_t group, const uint32_t* members, uint32_t count) {
    SetRecord set{};
    set.group = group;
    set.dtype = tables.tensors[members[0]].key_dtype;  // a global group's keys share one dtype (validate.cpp)
    set.first_member = static_cast<uint32_t>(tables.members.size());
    set.member_count = count;
    for (uint32_t m = 0; m < count; ++m) {
      tables.members.push_back(members[m]);
      tables.tensors[members[m]].set = static_cast<uint32_t>(tables.sets.size());
      set.numel += tables.tensors[members[m]].numel;
      set.logical_numel += tables.tensors[members[m]].logical_numel;
      if (tables.tensors[members[m]].keys != tables.tensors[members[m]].grad) set.scored = 1u;
    }
    // A global group is all shards or all replicas (validate.cpp).
    set.sharded = is_shard(tensors[members[0]]) ? 1u : 0u;
    set.counts_here = set.sharded || rank == 0 ? 1u : 0u;
    tables.sharded = tables.sharded || set.sharded;
    tables.has_multi_tensor_sets = tables.has_multi_tensor_sets || count > 1;
    tables.sets.push_back(set);
  };
  for (size_t g = 0; g < groups.size(); ++g) {
    const std::vector<uint32_t>& members = members_of_group[g];
    if (members.empty()) continue;
    if (groups[g].scope == GMTK_SCOPE_GLOBAL) {
      add_set(static_cast<uint32_t>(g), members.data(), static_cast<uint32_t>(members.size()));
    } else {
      for (const uint32_t& member : members) add_set(static_cast<uint32_t>(g), &member, 1);
    }
  }
  // Without shards nothing is summed over the ranks (data parallel only: each
  // rank selects its own replicas, which are the same): every rank counts.
  if (!tables.sharded) {
    for (SetRecord& set : tables.sets) set.counts_here = 1u;
  }

  // Large sets get a histogram in the workspace (and fp32 ones a candidate
  // region); small sets are selected by one block in shared memory.
  for (uint32_t s = 0; s < tables.sets.size(); ++s) {
    SetRecord& set = tables.sets[s];
    set.large = is_large(set, tuning) ? 1u : 0u;
    if (!set.large) {
      tables.small_sets.push_back(s);
      continue;
    }
    tables.large_sets.push_back(s);
    set.histogram_offset = tables.histogram_counters;
    tables.histogram_counters += kHistogramSlots;
    if (set.dtype == kFloat32) ++tables.large_fp32_sets;
    // Candidates and deferral would size this rank's regions by counts summed
    // over the ranks: a sharded set reads its gradients at every level instead.
    if (set.dtype == kFloat32 && !set.sharded) {
      set.candidate_offset = tables.candidate_keys;
      set.candidate_capacity = std::max(tuning.min_candidates, set.numel / tuning.candidate_share);
      tables.candidate_keys += set.candidate_capacity;
      set.deferral_offset = tables.deferral_slots;
      set.deferral_capacity =
          std::min(set.candidate_capacity, std::max(tuning.min_deferrals, set.numel / tuning.deferral_share));
      tables.deferral_slots += set.deferral_capacity;
    }
  }

  // Chunks: large fp32 sets first (passes B and C launch over just them),
  // then large 16-bit sets, then small sets (pass A's found_inf, the mask).
  const auto chunks_of_class = [&](bool large, bool fp32) {
    for (uint32_t s = 0; s < tables.sets.size(); ++s) {
      const SetRecord& set = tables.sets[s];
      if ((set.large != 0) != large || (large && (set.dtype == kFloat32) != fp32)) continue;
      const size_t before = tables.chunks.size();
      // Deferred positions pack the entry in its chunk in 16 bits (step_passes.hpp).
      append_chunks(tables, s, std::min<uint64_t>(tuning.chunk_entries, uint64_t{1} << 16), &tables.chunks);
      tables.sets[s].chunk_count = static_cast<uint32_t>(tables.chunks.size() - before);
    }
  };
  chunks_of_class(true, true);
  tables.large_fp32_chunks = tables.chunks.size();
  chunks_of_class(true, false);
  tables.large_chunks = tables.chunks.size();
  chunks_of_class(false, false);
  return tables;
}

SelectionWorkspace selection_workspace(const SelectionTables& tables) {
  WorkspaceLayout layout;
  SelectionWorkspace workspace{};
  workspace.set_states = layout.reserve(tables.sets.size() * sizeof(SetState));
  workspace.histograms = layout.reserve(tables.histogram_counters * sizeof(unsigned long long));
  // Counted per tensor for multi-tensor sets, and for every tensor under a given input.
  workspace.tensor_kept = layout.reserve(tables.tensors.size() * sizeof(unsigned long long));
  workspace.flags = layout.reserve(WorkspaceLayout::kAlignment);
  workspace.zeroed_bytes = workspace.flags + WorkspaceLayout::kAlignment;
  workspace.candidates = layout.reserve(tables.candidate_keys * sizeof(uint32_t));
  workspace.deferrals = layout.reserve(tables.deferral_slots * sizeof(unsigned long long));
  workspace.required_bytes = layout.required_bytes();
  return workspace;
}

SelectionSchedule selection_schedule(const SelectionTables& tables, const SelectionRequest& request) {
  SelectionSchedule schedule{};
  // Given thresholds or a given bitmap decide the mask: nothing is selected.
  const bool select = request.any_masking && !request.given;
  // A step needs found_inf even unasked: a non-finite gradient makes it a no-op.
  // Sharded: every rank makes the same passes (the collectives between them
  // must match), so nothing here may depend on this rank's chunks or on what
  // its own arguments ask; found_inf and kept counts are then always summed.
  const bool sharded = request.sharded;
  schedule.check_non_finite = request.mask_gradients || request.wants_found_inf || request.step || sharded;
  const bool large_selection = select && !tables.large_sets.empty();
  schedule.sample = large_selection;
  schedule.pass_a = schedule.check_non_finite ? (!tables.chunks.empty() || sharded) : large_selection;
  schedule.pass_a_chunks = schedule.check_non_finite ? tables.chunks.size() : tables.large_chunks;
  schedule.large_scan = large_selection;
  schedule.level_passes = !large_selection ? 0 : (tables.large_fp32_sets > 0 ? 3 : 2);
  schedule.small_sets = select && !tables.small_sets.empty();
  schedule.zero_masked = request.mask_gradients && (select || request.given);
  // Under a given input no set has a kept count of its own: every tensor is counted.
  schedule.count_kept_per_tensor = (request.wants_kept_counts || sharded) &&
                                   ((tables.has_multi_tensor_sets && select) || request.given);
  schedule.write_mask_bits = request.write_mask_bits && tables.mask_words > 0;
  schedule.apply = schedule.zero_masked || schedule.count_kept_per_tensor || schedule.write_mask_bits;
  schedule.update = request.step && !tables.chunks.empty();
  // The bitmap is written before the update: every threshold must be exact by
  // then. Decided by the request, not by this rank's word count (a rank of
  // empty shards has none): the deferred level's exchange must be on every rank.
  schedule.deferred =
      request.step && large_selection && tables.large_fp32_sets > 0 && !request.write_mask_bits;
  schedule.exchange = sharded;
  return schedule;
}

void bind_table_sizes(const SelectionTables& tables, SelectionLaunch* launch) {
  launch->chunk_count = tables.chunks.size();
  launch->large_chunks = tables.large_chunks;
  launch->sample_entries = tables.sample_entries;
  launch->tensor_count = static_cast<uint32_t>(tables.tensors.size());
  launch->large_set_count = static_cast<uint32_t>(tables.large_sets.size());
  launch->small_set_count = static_cast<uint32_t>(tables.small_sets.size());
  launch->mask_words = tables.mask_words;
}

SelectionSchedule bind_call(const SelectionTables& tables, const SelectionWorkspace& layout,
                            unsigned char* workspace_base, const std::vector<gmtkGroupConfig_t>& groups,
                            const gmtkStepArgs_t& args, EngineCall call, SelectionLaunch* launch) {
  launch->states = reinterpret_cast<SetState*>(workspace_base + layout.set_states);
  launch->histograms = reinterpret_cast<unsigned long long*>(workspace_base + layout.histograms);
  launch->tensor_kept = reinterpret_cast<unsigned long long*>(workspace_base + layout.tensor_kept);
  launch->flags = reinterpret_cast<uint32_t*>(workspace_base + layout.flags);
  launch->candidates = reinterpret_cast<uint32_t*>(workspace_base + layout.candidates);
  launch->deferred_positions = reinterpret_cast<unsigned long long*>(workspace_base + layout.deferrals);
  launch->inv_loss_scale = args.inv_loss_scale;
  launch->thresholds = args.thresholds;
  launch->kept_counts = args.kept_counts;
  launch->found_inf = args.found_inf;
  launch->step_count = call == EngineCall::step ? args.step_count : nullptr;
  launch->given_thresholds = args.given_thresholds;
  launch->given_mask_bits = args.given_mask_bits;
  launch->mask_bits = args.mask_bits;
  const MaskSource source = args.given_mask_bits != nullptr    ? MaskSource::given_bits
                            : args.given_thresholds != nullptr ? MaskSource::given_thresholds
                                                               : MaskSource::selected;
  launch->mask_source = static_cast<uint32_t>(source);

  SelectionRequest request{};
  request.mask_gradients = call == EngineCall::mask_gradients;
  request.step = call == EngineCall::step;
  request.wants_found_inf = args.found_inf != nullptr;
  request.wants_kept_counts = args.kept_counts != nullptr;
  request.sharded = tables.sharded;
  request.given = source != MaskSource::selected;
  request.write_mask_bits = args.mask_bits != nullptr;
  for (size_t g = 0; g < groups.size(); ++g) {
    launch->mask_ratio[g] = groups[g].mask_ratio;
    request.any_masking = request.any_masking || groups[g].mask_ratio > 0.0;
  }
  const SelectionSchedule schedule = selection_schedule(tables, request);
  launch->check_non_finite = schedule.check_non_finite ? 1u : 0u;
  launch->zero_masked = schedule.zero_masked ? 1u : 0u;
  launch->count_kept_per_tensor = schedule.count_kept_per_tensor ? 1u : 0u;
  launch->may_defer = schedule.deferred ? 1u : 0u;
  if (!schedule.write_mask_bits) launch->mask_bits = nullptr;  // the apply pass writes bits where this is set
  return schedule;
}

ExchangeSpans exchange_spans(const SelectionTables& tables, const SelectionSchedule& schedule,
                             const SelectionLaunch& launch, ExchangePoint point) {
  ExchangeSpans spans{};
  if (point == ExchangePoint::apply) {
    spans.span[0] = {launch.tensor_kept, schedule.count_kept_per_tensor ? tables.tensors.size() : 0};
    return spans;
  }
  // Pass A runs for found_inf alone when no large set selects: no histogram then.
  spans.span[0] = {launch.histograms, schedule.large_scan ? tables.histogram_counters : 0};
  // found_inf's flag is the first of the flags' words; summed, it is nonzero
  // where any rank's was (ranks < 2^32).
  if (point == ExchangePoint::level_0) spans.span[1] = {reinterpret_cast<unsigned long long*>(launch.flags), 1};
  return spans;
}

}  // namespace gmtk::kernels
