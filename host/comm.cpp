#include "comm.hpp"

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu_reference/dtypes.hpp"
#include "status.hpp"

namespace gmtk {
namespace {

float load_gradient(const void* buffer, gmtkDtype_t dtype, uint64_t i) {
  return reference::with_storage_type(dtype, [&](auto type) {
    using T = decltype(type);
    return reference::to_float(static_cast<const T*>(buffer)[i]);
  });
}

void store_gradient(void* buffer, gmtkDtype_t dtype, uint64_t i, float value) {
  reference::with_storage_type(dtype, [&](auto type) {
    using T = decltype(type);
    static_cast<T*>(buffer)[i] = reference::from_float<T>(value);
  });
}

// The state the ranks of one in-process group share. A collective is a
// rendezvous: each rank leaves its buffers in its slot; the last to arrive
// checks that every rank made the same call, combines the buffers (every
// other rank is waiting, so their buffers are still), and releases them.
class InProcessGroup {
 public:
  enum class Kind : uint8_t { all_reduce_sum, all_gather, reduce_gradients_sum, reduce_gradients_mean };

  // A reduce_gradients call's buffers, which `send` points to.
  struct Gradients {
    void* const* buffers;
    const uint64_t* numels;
    const gmtkDtype_t* dtypes;
  };

  explicit InProcessGroup(int size) : slots_(static_cast<size_t>(size)) {}

  int size() const { return static_cast<int>(slots_.size()); }

  gmtkStatus_t collective(int rank, Kind kind, const void* send, void* receive, size_t length) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    slots_[static_cast<size_t>(rank)] = Slot{kind, send, receive, length};
    if (++arrived_ == size()) {
      outcome_ = combine();
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
    } else {
      // No rank can finish the next collective before this one has woken:
      // it needs this rank too, so outcome_ still holds this generation's.
      released_.wait(lock, [&] { return generation_ != generation; });
    }
    return outcome_;
  }

 private:
  struct Slot {
    Kind kind;
    const void* send;
    void* receive;
    size_t length;  // values (all_reduce_sum) or bytes per rank (all_gather)
  };

  bool same_call() const {
    for (const Slot& slot : slots_) {
      if (slot.kind != slots_[0].kind || slot.length != slots_[0].length) return false;
    }
    if (slots_[0].kind != Kind::reduce_gradients_sum && slots_[0].kind != Kind::reduce_gradients_mean) return true;
    const auto& first = *static_cast<const Gradients*>(slots_[0].send);
    for (const Slot& slot : slots_) {
      const auto& gradients = *static_cast<const Gradients*>(slot.send);
      for (size_t i = 0; i < slot.length; ++i) {
        if (gradients.numels[i] != first.numels[i] || gradients.dtypes[i] != first.dtypes[i]) return false;
      }
    }
    return true;
  }

  // Entry by entry: widened to fp32, summed in rank order, divided by the
  // rank count for the mean, rounded once to the gradient's dtype (16-bit:
  // to nearest even); every rank gets the same bits.
  void reduce_gradients(bool mean) {
    const size_t tensors = slots_[0].length;
    const float ranks = static_cast<float>(slots_.size());
    for (size_t t = 0; t < tensors; ++t) {
      const auto& first = *static_cast<const Gradients*>(slots_[0].send);
      const gmtkDtype_t dtype = first.dtypes[t];
      for (uint64_t i = 0; i < first.numels[t]; ++i) {
        float sum = 0.0f;
        for (const Slot& slot : slots_) {
          sum += load_gradient(static_cast<const Gradients*>(slot.send)->buffers[t], dtype, i);
        }
        if (mean) sum = sum / ranks;
        for (const Slot& slot : slots_) store_gradient(static_cast<const Gradients*>(slot.send)->buffers[t], dtype, i, sum);
      }
    }
  }

  gmtkStatus_t combine() {
    if (!same_call()) return GMTK_ERROR_INVALID_ARGUMENT;
    const size_t length = slots_[0].length;
    if (slots_[0].kind == Kind::reduce_gradients_sum || slots_[0].kind == Kind::reduce_gradients_mean) {
      reduce_gradients(slots_[0].kind == Kind::reduce_gradients_mean);
      return GMTK_SUCCESS;
    }
    if (slots_[0].kind == Kind::all_reduce_sum) {
      // Element by element, every rank's value is read before any is written:
      // no scratch needed, and the buffers may be the ranks' own in place.
      for (size_t i = 0; i < length; ++i) {
        uint64_t sum = 0;
        for (const Slot& slot : slots_) sum += static_cast<const uint64_t*>(slot.send)[i];
        for (const Slot& slot : slots_) static_cast<uint64_t*>(slot.receive)[i] = sum;
      }
    } else {
      for (const Slot& target : slots_) {
        auto* receive = static_cast<unsigned char*>(target.receive);
        for (size_t r = 0; r < slots_.size(); ++r) {
          if (length > 0) std::memcpy(receive + r * length, slots_[r].send, length);
        }
      }
    }
    return GMTK_SUCCESS;
  }

  std::mutex mutex_;
  std::condition_variable released_;
  std::vector<Slot> slots_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  gmtkStatus_t outcome_ = GMTK_SUCCESS;
};

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<InProcessGroup> group, int rank) : group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }

  gmtkStatus_t all_reduce_sum(uint64_t* values, size_t count, gmtkStream_t) override {
    add_payload(count * sizeof(uint64_t));
    return report(group_->collective(rank_, InProcessGroup::Kind::all_reduce_sum, values, values, count));
  }

  gmtkStatus_t all_gather(const void* send, size_t bytes, void* receive, gmtkStream_t) override {
    add_payload(bytes);
    return report(group_->collective(rank_, InProcessGroup::Kind::all_gather, send, receive, bytes));
  }

  gmtkStatus_t all_reduce_gradients(void* const* buffers, const uint64_t* numels, const gmtkDtype_t* dtypes,
                                    size_t count, bool average, gmtkStream_t) override {
    for (size_t i = 0; i < count; ++i) add_payload(numels[i] * (dtypes[i] == GMTK_FLOAT32 ? 4u : 2u));
    const InProcessGroup::Gradients gradients{buffers, numels, dtypes};
    const auto kind = average ? InProcessGroup::Kind::reduce_gradients_mean : InProcessGroup::Kind::reduce_gradients_sum;
    return report(group_->collective(rank_, kind, &gradients, nullptr, count));
  }

  bool on_device() const override { return false; }

 private:
  gmtkStatus_t report(gmtkStatus_t status) const {
    if (status == GMTK_SUCCESS) return status;
    return fail(status, "the ranks of the in-process communicator made different collective calls (rank %d): "
                "their plans or calls disagree", rank_);
  }

  std::shared_ptr<InProcessGroup> group_;
  int rank_;
};

}  // namespace

gmtkStatus_t make_in_process_communicators(int num_ranks, std::shared_ptr<Communicator>* communicators) {
  auto group = std::make_shared<InProcessGroup>(num_ranks);
  for (int r = 0; r < num_ranks; ++r) communicators[r] = std::make_shared<InProcessCommunicator>(group, r);
  return GMTK_SUCCESS;
}

}  // namespace gmtk
