// torch.classes.rmt_fast.MemoryStore: per-segment memory states for segment-level checkpointing.
//
// put(segment, state [B, M, d])  keep a (detached) state; with offload=True a copy on the host
//                                (pinned when the state is on CUDA, D2H copy async on the
//                                current stream); on CPU offload is a plain copy.
// get(segment) -> Tensor         the state, back on its original device.
// pop(segment) -> Tensor         get + forget.
// prefetch(segment)              CUDA offload: async H2D copy on a side stream, fenced by an
//                                event that a later get() makes the current stream wait on.
//                                Otherwise a no-op.
// has / size / segments / nbytes / clear / offload.
//
// Only device-generic c10 APIs (VirtualGuardImpl, c10::Event, StreamGuard) are used, so this file
// compiles against a CPU-only torch and works unchanged against a CUDA torch.
#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace rmt_fast {

class MemoryStore : public torch::CustomClassHolder {
 public:
  explicit MemoryStore(bool offload) : offload_(offload) {}

  void put(int64_t segment, const at::Tensor& state) {
    TORCH_CHECK(state.defined(), "MemoryStore.put: segment ", segment, ": state is undefined");
    Entry e(state.device());
    const at::Tensor s = state.detach();
    if (!offload_) {
      e.state = s;
    } else if (s.device().is_cpu()) {
      e.state = s.clone();
    } else {
      e.offloaded = true;
      e.state = at::empty(s.sizes(), s.options().device(at::kCPU).pinned_memory(
                                          s.device().is_cuda()));
      e.state.copy_(s, /*non_blocking=*/true);
      c10::impl::VirtualGuardImpl impl(s.device().type());
      e.copied = std::make_shared<c10::Event>(s.device().type());
      e.copied->record(impl.getStream(s.device()));
    }
    entries_.erase(segment);
    entries_.emplace(segment, std::move(e));
  }

  at::Tensor get(int64_t segment) { return fetch("get", segment); }

  at::Tensor pop(int64_t segment) {
    at::Tensor out = fetch("pop", segment);
    entries_.erase(segment);
    return out;
  }

  at::Tensor fetch(const char* what, int64_t segment) {
    Entry& e = lookup(what, segment);
    if (!e.offloaded) return e.state;
    c10::impl::VirtualGuardImpl impl(e.device.type());
    const c10::Stream current = impl.getStream(e.device);
    if (e.prefetched.defined()) {
      e.ready->block(current);
      impl.recordDataPtrOnStream(e.prefetched.storage().data_ptr(), current);
      at::Tensor out = e.prefetched;
      e.prefetched = at::Tensor();
      e.ready.reset();
      return out;
    }
    e.copied->block(current);
    return e.state.to(e.device, /*non_blocking=*/true);
  }

  void prefetch(int64_t segment) {
    Entry& e = lookup("prefetch", segment);
    if (!e.offloaded || e.prefetched.defined()) return;
    c10::impl::VirtualGuardImpl impl(e.device.type());
    const c10::Stream side = impl.getStreamFromGlobalPool(e.device, /*isHighPriority=*/false);
    e.copied->block(side);
    c10::StreamGuard guard(side);
    e.prefetched = e.state.to(e.device, /*non_blocking=*/true);
    e.ready = std::make_shared<c10::Event>(e.device.type());
    e.ready->record(side);
  }

  bool has(int64_t segment) const { return entries_.count(segment) > 0; }
  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  bool offload() const { return offload_; }
  void clear() { entries_.clear(); }

  std::vector<int64_t> segments() const {
    std::vector<int64_t> out;
    out.reserve(entries_.size());
    for (const auto& kv : entries_) out.push_back(kv.first);
    return out;
  }

  // Bytes held by the store (host copies, device states and pending prefetches).
  int64_t nbytes() const {
    int64_t total = 0;
    for (const auto& kv : entries_) {
      total += static_cast<int64_t>(kv.second.state.nbytes());
      if (kv.second.prefetched.defined()) {
        total += static_cast<int64_t>(kv.second.prefetched.nbytes());
      }
    }
    return total;
  }

 private:
  struct Entry {
    explicit Entry(c10::Device d) : device(d) {}
    c10::Device device;                   // where the state came from (and goes back to)
    at::Tensor state;                     // the state itself, or its host copy when offloaded
    bool offloaded = false;               // state is a host copy of a non-CPU tensor
    std::shared_ptr<c10::Event> copied;   // D2H copy done (offloaded only)
    at::Tensor prefetched;                // device copy made by prefetch()
    std::shared_ptr<c10::Event> ready;    // prefetch copy done
  };

  Entry& lookup(const char* what, int64_t segment) {
    auto it = entries_.find(segment);
    if (it == entries_.end()) {
      std::ostringstream os;
      os << "[";
      bool first = true;
      for (const auto& kv : entries_) {
        os << (first ? "" : ", ") << kv.first;
        first = false;
      }
      os << "]";
      TORCH_CHECK(false, "MemoryStore.", what, ": no memory state stored for segment ", segment,
                  "; stored segments: ", os.str(), " (", entries_.size(), " states)");
    }
    return it->second;
  }

  bool offload_;
  std::map<int64_t, Entry> entries_;
};

TORCH_LIBRARY_FRAGMENT(rmt_fast, m) {
  m.class_<MemoryStore>("MemoryStore")
      .def(torch::init<bool>(), "", {torch::arg("offload") = false})
      .def("put", &MemoryStore::put)
      .def("get", &MemoryStore::get)
      .def("pop", &MemoryStore::pop)
      .def("prefetch", &MemoryStore::prefetch)
      .def("has", &MemoryStore::has)
      .def("size", &MemoryStore::size)
      .def("offload", &MemoryStore::offload)
      .def("clear", &MemoryStore::clear)
      .def("segments", &MemoryStore::segments)
      .def("nbytes", &MemoryStore::nbytes);
}

}  // namespace rmt_fast
