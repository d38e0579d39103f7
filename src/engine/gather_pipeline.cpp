#include "engine/gather_pipeline.h"

#include <algorithm>
#include <cstring>

#include "gradiveq/errors.h"

namespace gradiveq {

void MessageCodec::set_slot_state(int64_t, const at::Tensor& state) {
  GVQ_CHECK_ARG(!state.defined(), "MessageCodec.set_slot_state", "state", "must be undefined: the ", name(),
                " codec keeps no per-parameter state");
}

namespace detail {

const EncodedMessage& GatherPipeline::add(const at::Tensor& values, int64_t slot, uint64_t seed) {
  messages_.push_back(codec_->encode(values, slot, seed));
  numels_.push_back(values.numel());
  const EncodedMessage& m = messages_.back();
  const int64_t fixed = codec_->fixed_message_bytes(values.numel());
  GVQ_ASSERT(fixed < 0 || fixed == m.packed.numel(), "codec ", codec_->name(), " promised ", fixed,
             " bytes and wrote ", m.packed.numel());
  fixed_sizes_ = fixed_sizes_ && fixed >= 0;
  return m;
}

at::Tensor GatherPipeline::frame() const {
  if (!messages_.empty() && !messages_.front().packed.device().is_cpu()) {
    GVQ_ASSERT(!codec_->length_table(), "codec ", codec_->name(),
               " kept its messages on the device with a length table");
    std::vector<at::Tensor> packed;
    for (const auto& m : messages_) packed.push_back(m.packed);
    return at::cat(packed);
  }
  int64_t total = table_bytes();
  for (const auto& m : messages_) total += m.packed.numel();
  at::Tensor payload = at::empty({total}, at::kByte);
  uint8_t* out = payload.data_ptr<uint8_t>();
  int64_t at_byte = table_bytes();
  for (int64_t k = 0; k < num_messages(); ++k) {
    const int64_t len = messages_[k].packed.numel();
    if (codec_->length_table()) std::memcpy(out + 8 * k, &len, 8);
    std::memcpy(out + at_byte, messages_[k].packed.data_ptr<uint8_t>(), len);
    at_byte += len;
  }
  return payload;
}

c10::intrusive_ptr<c10::ivalue::Future> GatherPipeline::issue(c10d::ProcessGroup& pg,
                                                              const at::Device& device,
                                                              CollectiveBytes& bytes) {
  if (messages_.empty()) return {};
  const int64_t n = pg.getSize();
  const at::Tensor payload = frame();
  device_messages_ = !payload.device().is_cpu();
  messages_.clear();
  const int64_t payload_len = payload.numel();
  sizes_.assign(size_t(n), payload_len);
  if (!fixed_sizes_) {
    // Sizes differ by rank: learn them before sizing the padded all-gather.
    at::Tensor mine = at::full({1}, payload_len, at::TensorOptions(at::kLong)).to(device);
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int64_t r = 0; r < n; ++r) outputs[0].push_back(at::empty({1}, mine.options()));
    std::vector<at::Tensor> inputs{mine};
    pg.allgather(outputs, inputs)->wait();
    for (int64_t r = 0; r < n; ++r) sizes_[r] = outputs[0][r].item<int64_t>();
    GVQ_ASSERT(sizes_[pg.getRank()] == payload_len,
               "all-gathered size of this rank differs from its payload");
    bytes.all_gather(8, n);
  }
  const int64_t padded = *std::max_element(sizes_.begin(), sizes_.end());
  at::Tensor local = payload;
  if (padded > payload_len) {
    local = at::zeros({padded}, at::kByte);
    local.narrow(0, 0, payload_len).copy_(payload);
  }
  local = local.to(device);
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < n; ++r) outputs[0].push_back(at::empty({padded}, local.options()));
  std::vector<at::Tensor> inputs{local};
  auto future = pg.allgather(outputs, inputs)->getFuture();
  gathered_ = outputs[0];
  bytes.all_gather(padded, n);
  return future;
}

int64_t GatherPipeline::message_bytes(const uint8_t* payload, int64_t k) const {
  if (!codec_->length_table()) return codec_->fixed_message_bytes(numels_[k]);
  int64_t len = 0;
  std::memcpy(&len, payload + 8 * k, 8);
  return len;
}

std::vector<at::Tensor> GatherPipeline::decoded_sums() const {
  const bool on_device = device_messages_ && !gathered_.empty();
  std::vector<at::Tensor> sums;
  for (int64_t numel : numels_) {
    sums.push_back(at::zeros(
        {numel}, at::TensorOptions(at::kFloat).device(on_device ? gathered_[0].device() : at::kCPU)));
  }
  if (on_device) {
    decode_on_device(sums);
    return sums;
  }
  for (int64_t r = 0; r < int64_t(gathered_.size()); ++r) {
    at::Tensor host = gathered_[r].to(at::kCPU).contiguous();
    const uint8_t* bytes = host.data_ptr<uint8_t>();
    const int64_t size = sizes_[r];
    GVQ_ASSERT(size >= table_bytes() && size <= host.numel(), "rank ", r, " sent ", size, " bytes");
    int64_t at_byte = table_bytes();
    for (int64_t k = 0; k < num_messages(); ++k) {
      const int64_t len = message_bytes(bytes, k);
      GVQ_ASSERT(len >= 0 && at_byte + len <= size, "rank ", r, "'s message ", k, " overruns its payload");
      codec_->decode_add(host.narrow(0, at_byte, len), sums[k]);
      at_byte += len;
    }
    GVQ_ASSERT(at_byte == size, "rank ", r, "'s payload holds ", size - at_byte, " unread bytes");
  }
  return sums;
}

// Device messages have fixed sizes and no length table: each one's place follows from the shapes.
void GatherPipeline::decode_on_device(std::vector<at::Tensor>& sums) const {
  for (const auto& payload : gathered_) {
    int64_t at_byte = 0;
    for (int64_t k = 0; k < num_messages(); ++k) {
      const int64_t len = codec_->fixed_message_bytes(numels_[k]);
      codec_->decode_add(payload.narrow(0, at_byte, len), sums[k]);
      at_byte += len;
    }
  }
}

}  // namespace detail
}  // namespace gradiveq
