#include "shards.hpp"

#include <algorithm>
#include <cinttypes>
#include <cstring>
#include <vector>

#include "comm.hpp"
#include "status.hpp"

namespace gmtk {
namespace {

// FNV-1a over the fields that must agree across ranks.
class Signature {
 public:
  template <typename T>
  void add(const T& value) {
    unsigned char bytes[sizeof(T)];
    std::memcpy(bytes, &value, sizeof(T));
    for (unsigned char byte : bytes) hash_ = (hash_ ^ byte) * 0x100000001b3ull;
  }
  uint64_t value() const { return hash_; }

 private:
  uint64_t hash_ = 0xcbf29ce484222325ull;
};

// What decides the selection's collectives: groups' optimizer, scope, mode and
// ratio; tensors' group, gradient dtype, and logical size.
uint64_t plan_signature(const Plan& plan) {
  Signature signature;
  signature.add(plan.groups.size());
  for (const gmtkGroupConfig_t& group : plan.groups) {
    signature.add(group.optimizer);
    signature.add(group.scope);
    signature.add(group.mask_mode);
    signature.add(group.mask_ratio);
  }
  signature.add(plan.tensors.size());
  for (const gmtkTensor_t& tensor : plan.tensors) {
    signature.add(tensor.group);
    signature.add(tensor.grad_dtype);
    signature.add(selection_dtype(tensor));
    signature.add(tensor.score != nullptr);  // a scored set never defers: the ranks' schedules must match
    signature.add(is_shard(tensor));
    signature.add(logical_numel(tensor));
  }
  return signature.value();
}

struct RankVerdict {
  uint64_t status;
  uint64_t signature;
};

// Every rank's verdict; fails on every rank if one failed or two disagree.
gmtkStatus_t exchange_verdicts(Communicator& comm, RankVerdict own, const char* what, RankVerdict* verdicts,
                               bool own_failed) {
  const gmtkStatus_t exchanged = comm.all_gather_host(&own, sizeof(own), verdicts);
  if (own_failed) return static_cast<gmtkStatus_t>(own.status);
  if (exchanged != GMTK_SUCCESS) return exchanged;
  for (int r = 0; r < comm.size(); ++r) {
    if (verdicts[r].status != GMTK_SUCCESS) {  // that rank's status, on every rank
      const auto status = static_cast<gmtkStatus_t>(verdicts[r].status);
      return fail(status,
                  "rank %d of the communicator refused its %s with status %d (%s; its gmtkGetLastErrorMessage() says "
                  "why); it fails on every rank and writes nothing",
                  r, what, static_cast<int>(status), gmtkGetErrorString(status));
    }
  }
  for (int r = 1; r < comm.size(); ++r) {
    if (verdicts[r].signature != verdicts[0].signature) {
      return fail(GMTK_ERROR_INVALID_ARGUMENT,
                  "the %s of ranks 0 and %d of the communicator disagree (groups' optimizer, scope, mask mode or "
                  "mask ratio, or tensors' count, group, gradient dtype or logical size)",
                  what, r);
    }
  }
  return GMTK_SUCCESS;
}

struct Extent {
  int64_t offset;
  int64_t numel;
  int rank;
};

// The shards of each logical tensor, from every rank, must tile it exactly.
gmtkStatus_t check_tiling(Communicator& comm, const Plan& plan) {
  const size_t count = plan.tensors.size();
  const int ranks = comm.size();
  std::vector<int64_t> own(2 * count);
  for (size_t t = 0; t < count; ++t) {
    own[2 * t] = plan.tensors[t].shard_offset;
    own[2 * t + 1] = plan.tensors[t].numel;
  }
  std::vector<int64_t> all(2 * count * static_cast<size_t>(ranks));
  GMTK_CHECK(comm.all_gather_host(own.data(), own.size() * sizeof(int64_t), all.data()));
  std::vector<Extent> extents;
  extents.reserve(static_cast<size_t>(ranks));
  for (size_t t = 0; t < count; ++t) {
    const gmtkTensor_t& tensor = plan.tensors[t];
    if (!is_shard(tensor)) {
      for (int r = 0; r < ranks; ++r) {
        const int64_t numel = all[(static_cast<size_t>(r) * count + t) * 2 + 1];
        if (numel != tensor.numel) {
          return fail(GMTK_ERROR_INVALID_ARGUMENT,
                      "tensors[%zu] is a replica (no logical_numel) of %" PRId64 " entries here but of %" PRId64
                      " on rank %d; a replica is the whole tensor on every rank",
                      t, tensor.numel, numel, r);
        }
      }
      continue;
    }
    extents.clear();
    for (int r = 0; r < ranks; ++r) {
      const size_t at = (static_cast<size_t>(r) * count + t) * 2;
      if (all[at + 1] > 0) extents.push_back(Extent{all[at], all[at + 1], r});
    }
    std::sort(extents.begin(), extents.end(),
              [](const Extent& a, const Extent& b) { return a.offset < b.offset; });
    int64_t covered = 0;
    int previous_rank = -1;
    for (const Extent& extent : extents) {
      if (extent.offset < covered) {
        return fail(GMTK_ERROR_INVALID_ARGUMENT,
                    "the shards of tensors[%zu] on ranks %d and %d overlap (entries from %" PRId64
                    "): a logical tensor's shards must not share entries",
                    t, previous_rank, extent.rank, extent.offset);
      }
      if (extent.offset > covered) break;
      covered = extent.offset + extent.numel;
      previous_rank = extent.rank;
    }
    if (covered != tensor.logical_numel) {
      return fail(GMTK_ERROR_INVALID_ARGUMENT,
                  "the shards of tensors[%zu] over the communicator's %d ranks do not cover entries from %" PRId64
                  " of its %" PRId64 "; the shards must tile the logical tensor exactly (is the communicator the "
                  "one the shards were laid out for?)",
                  t, ranks, covered, tensor.logical_numel);
    }
  }
  return GMTK_SUCCESS;
}

}  // namespace

gmtkStatus_t agree_on_plan(Communicator& comm, Plan* plan, gmtkStatus_t local_status) {
  const bool own_failed = local_status != GMTK_SUCCESS;
  const RankVerdict own{static_cast<uint64_t>(local_status), own_failed ? 0 : plan_signature(*plan)};
  std::vector<RankVerdict> verdicts(static_cast<size_t>(comm.size()));
  GMTK_CHECK(exchange_verdicts(comm, own, "plan", verdicts.data(), own_failed));
  GMTK_CHECK(check_tiling(comm, *plan));
  plan->signature = own.signature;
  return GMTK_SUCCESS;
}

gmtkStatus_t agree_on_call(const Plan& plan, Operation operation, gmtkGradientReduction_t gradient_reduction,
                           uint32_t mask_inputs, gmtkStatus_t local_status) {
  Communicator& comm = *plan.comm;
  const bool own_failed = local_status != GMTK_SUCCESS;
  Signature signature;
  signature.add(plan.signature);
  signature.add(operation);
  for (const gmtkGroupConfig_t& group : plan.groups) signature.add(group.mask_ratio);
  signature.add(gradient_reduction);
  signature.add(mask_inputs);  // which keep rule the call uses decides its collectives
  // A call allocates nothing: the ranks' verdicts go in the plan's buffer.
  static_assert(sizeof(RankVerdict) == 2 * sizeof(uint64_t), "Plan::call_verdicts holds two words per rank");
  auto* verdicts = reinterpret_cast<RankVerdict*>(plan.call_verdicts.data());
  return exchange_verdicts(comm, RankVerdict{static_cast<uint64_t>(local_status), signature.value()}, "call",
                           verdicts, own_failed);
}

gmtkStatus_t reduce_replica_gradients(const Plan& plan, gmtkGradientReduction_t reduction, gmtkStream_t stream) {
  if (reduction == GMTK_GRADIENTS_AS_GIVEN) return GMTK_SUCCESS;
  return plan.comm->all_reduce_gradients(plan.replica_grads.data(), plan.replica_numels.data(),
                                         plan.replica_dtypes.data(), plan.replica_grads.size(),
                                         reduction == GMTK_GRADIENTS_AVERAGE, stream);
}

}  // namespace gmtk
