#include "block_manager.h"

#include <algorithm>
#include <sstream>

namespace citer {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t slot_of(int64_t handle) { return handle & 0xffffffffLL; }
uint32_t generation_of(int64_t handle) { return static_cast<uint32_t>(handle >> 32); }
}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) throw std::invalid_argument("num_blocks must be in [1, 2^31)");
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive");
  refcount_.assign(num_blocks, 0);
  free_.reserve(num_blocks);
  // LIFO: hand out low block ids first
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

BlockManager::Seq& BlockManager::get(int64_t handle) {
  return const_cast<Seq&>(static_cast<const BlockManager*>(this)->get(handle));
}

const BlockManager::Seq& BlockManager::get(int64_t handle) const {
  int64_t slot = slot_of(handle);
  if (handle < 0 || slot >= static_cast<int64_t>(seqs_.size()) || !seqs_[slot].live ||
      seqs_[slot].generation != generation_of(handle)) {
    throw std::invalid_argument("stale or unknown sequence handle " + std::to_string(handle));
  }
  return seqs_[slot];
}

int64_t BlockManager::create_sequence() {
  int64_t slot;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot = static_cast<int64_t>(seqs_.size());
    seqs_.emplace_back();
  }
  Seq& s = seqs_[slot];
  s.table.clear();
  s.num_tokens = 0;
  s.generation += 1;  // invalidates any handle to the slot's previous occupant
  s.live = true;
  ++live_;
  return (static_cast<int64_t>(s.generation) << 32) | slot;
}

int64_t BlockManager::fork(int64_t handle) {
  const Seq parent = get(handle);  // copy: create_sequence may reallocate seqs_
  int64_t child = create_sequence();
  Seq& c = get(child);
  c.table = parent.table;
  c.num_tokens = parent.num_tokens;
  for (int32_t b : c.table) refcount_[b] += 1;
  return child;
}

int32_t BlockManager::allocate_block() {
  int32_t b = free_.back();
  free_.pop_back();
  refcount_[b] = 1;
  stats_.allocations += 1;
  stats_.peak_used_blocks = std::max(stats_.peak_used_blocks, num_blocks_ - num_free_blocks());
  return b;
}

void BlockManager::release_block(int32_t block) {
  if (--refcount_[block] == 0) {
    free_.push_back(block);
    stats_.frees += 1;
  }
}

void BlockManager::free_sequence(int64_t handle) {
  Seq& s = get(handle);
  for (int32_t b : s.table) release_block(b);
  s.table.clear();
  s.num_tokens = 0;
  s.live = false;
  free_slots_.push_back(slot_of(handle));
  --live_;
}

int64_t BlockManager::blocks_needed(int64_t handle, int64_t num_new_tokens) const {
  const Seq& s = get(handle);
  if (num_new_tokens < 0) throw std::invalid_argument("num_new_tokens must be >= 0");
  int64_t need = ceil_div(s.num_tokens + num_new_tokens, block_size_) - static_cast<int64_t>(s.table.size());
  // writing into a shared, partly filled last block needs a private copy of it
  bool cow = num_new_tokens > 0 && s.num_tokens % block_size_ != 0 && refcount_[s.table.back()] > 1;
  return need + (cow ? 1 : 0);
}

bool BlockManager::can_append(int64_t handle, int64_t num_new_tokens) const {
  return blocks_needed(handle, num_new_tokens) <= num_free_blocks();
}

void BlockManager::append_slots(int64_t handle, int64_t num_new_tokens) {
  int64_t need = blocks_needed(handle, num_new_tokens);
  if (need > num_free_blocks()) {
    std::ostringstream msg;
    msg << "KV cache full: need " << need << " blocks, " << num_free_blocks() << " free";
    throw CacheFull(msg.str());
  }
  Seq& s = get(handle);
  if (num_new_tokens > 0 && s.num_tokens % block_size_ != 0 && refcount_[s.table.back()] > 1) {
    int32_t shared = s.table.back();
    int32_t own = allocate_block();
    release_block(shared);
    s.table.back() = own;
    copy_ops_.emplace_back(shared, own);
  }
  s.num_tokens += num_new_tokens;
  while (static_cast<int64_t>(s.table.size()) < ceil_div(s.num_tokens, block_size_)) {
    s.table.push_back(allocate_block());
  }
}

int64_t BlockManager::truncate(int64_t handle, int64_t num_tokens) {
  Seq& s = get(handle);
  if (num_tokens < 0 || num_tokens > s.num_tokens) {
    throw std::invalid_argument("cannot truncate a sequence of " + std::to_string(s.num_tokens) + " tokens to " +
                                std::to_string(num_tokens));
  }
  int64_t keep = ceil_div(num_tokens, block_size_);
  int64_t dropped = static_cast<int64_t>(s.table.size()) - keep;
  for (int64_t i = keep; i < static_cast<int64_t>(s.table.size()); ++i) release_block(s.table[i]);
  s.table.resize(keep);
  s.num_tokens = num_tokens;
  return dropped;
}

const std::vector<int32_t>& BlockManager::block_table(int64_t handle) const { return get(handle).table; }

int64_t BlockManager::num_tokens(int64_t handle) const { return get(handle).num_tokens; }

int32_t BlockManager::ref_count(int64_t block) const {
  if (block < 0 || block >= num_blocks_) throw std::out_of_range("block id out of range");
  return refcount_[block];
}

std::vector<std::pair<int32_t, int32_t>> BlockManager::take_copy_ops() {
  std::vector<std::pair<int32_t, int32_t>> out;
  out.swap(copy_ops_);
  return out;
}

void BlockManager::check_invariants() const {
  std::vector<int32_t> refs(num_blocks_, 0), in_free(num_blocks_, 0);
  int64_t live = 0;
  for (const Seq& s : seqs_) {
    if (!s.live) continue;
    ++live;
    if (static_cast<int64_t>(s.table.size()) != ceil_div(s.num_tokens, block_size_)) {
      throw std::logic_error("a sequence's block table length does not match its token count");
    }
    for (int32_t b : s.table) {
      if (b < 0 || b >= num_blocks_) throw std::logic_error("block id out of range in a table");
      refs[b] += 1;
    }
  }
  for (int32_t b : free_) {
    if (in_free[b]++) throw std::logic_error("block " + std::to_string(b) + " is twice in the free list");
  }
  for (int64_t b = 0; b < num_blocks_; ++b) {
    if (in_free[b] && refs[b]) throw std::logic_error("block " + std::to_string(b) + " is free and in use");
    if (!in_free[b] && !refs[b]) throw std::logic_error("block " + std::to_string(b) + " is leaked");
    if (refs[b] != refcount_[b]) throw std::logic_error("block " + std::to_string(b) + " ref count is wrong");
  }
  if (live != live_) throw std::logic_error("live sequence count is wrong");
  if (stats_.allocations - stats_.frees != num_blocks_ - num_free_blocks()) {
    throw std::logic_error("allocation counters do not add up");
  }
}

void BlockManager::fill_block_tables(const std::vector<int64_t>& handles, int32_t* out, int64_t max_blocks,
                                     int32_t pad) const {
  for (size_t i = 0; i < handles.size(); ++i) {
    const auto& t = get(handles[i]).table;
    if (static_cast<int64_t>(t.size()) > max_blocks) {
      throw std::length_error("block table of " + std::to_string(t.size()) + " blocks does not fit in " +
                              std::to_string(max_blocks) + " columns");
    }
    int32_t* row = out + i * max_blocks;
    std::copy(t.begin(), t.end(), row);
    std::fill(row + t.size(), row + max_blocks, pad);
  }
}

void BlockManager::fill_slot_mapping(const std::vector<int64_t>& handles, const int64_t* starts,
                                     const int64_t* ends, int64_t* out, int64_t out_len) const {
  int64_t total = 0;
  for (size_t i = 0; i < handles.size(); ++i) {
    if (ends[i] < starts[i] || starts[i] < 0) throw std::invalid_argument("bad position range");
    total += ends[i] - starts[i];
  }
  if (total != out_len) {
    throw std::length_error("slot_mapping has " + std::to_string(out_len) + " entries, ranges need " +
                            std::to_string(total));
  }
  int64_t k = 0;
  for (size_t i = 0; i < handles.size(); ++i) {
    const auto& t = get(handles[i]).table;
    if (ends[i] > static_cast<int64_t>(t.size()) * block_size_) {
      throw std::invalid_argument("position " + std::to_string(ends[i] - 1) + " has no block");
    }
    for (int64_t p = starts[i]; p < ends[i]; ++p) {
      out[k++] = static_cast<int64_t>(t[p / block_size_]) * block_size_ + p % block_size_;
    }
  }
}

}  // namespace citer
