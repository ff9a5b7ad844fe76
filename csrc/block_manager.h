// Shared paged-KV page manager: one pool of fixed-size blocks, one block table per
// sequence, serving both models (each model keeps its own KV storage and indexes it
// with the same table). Position p of a sequence lives at
// (table[p / block_size], p % block_size).
//
// Handles are (generation << 32 | slot): a handle used after free_sequence no longer
// matches its slot's generation and is rejected as stale.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace citer {

struct CacheFull : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct BlockManagerStats {
  int64_t allocations = 0;  // blocks handed out
  int64_t frees = 0;        // blocks returned to the pool
  int64_t peak_used_blocks = 0;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size);

  int64_t create_sequence();
  int64_t fork(int64_t handle);  // shares all blocks (ref counts + 1)
  void free_sequence(int64_t handle);

  int64_t blocks_needed(int64_t handle, int64_t num_new_tokens) const;
  bool can_append(int64_t handle, int64_t num_new_tokens) const;
  // Grow by num_new_tokens; all-or-nothing: throws CacheFull and changes nothing.
  void append_slots(int64_t handle, int64_t num_new_tokens);
  // Shrink to num_tokens (a rollback): blocks past the new end are released (freed when
  // no other sequence shares them); -> how many blocks the table dropped.
  int64_t truncate(int64_t handle, int64_t num_tokens);

  const std::vector<int32_t>& block_table(int64_t handle) const;
  int64_t num_tokens(int64_t handle) const;
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_sequences() const { return live_; }
  int32_t ref_count(int64_t block) const;
  // (src, dst) block pairs whose contents must be copied before a write (fork + append
  // into a shared, partly filled last block); cleared when taken.
  std::vector<std::pair<int32_t, int32_t>> take_copy_ops();
  const BlockManagerStats& stats() const { return stats_; }

  // Throws std::logic_error describing the first broken invariant.
  void check_invariants() const;

  // out[b, :] = table of handles[b], padded with pad. out is [B, max_blocks] row-major.
  void fill_block_tables(const std::vector<int64_t>& handles, int32_t* out, int64_t max_blocks,
                         int32_t pad) const;
  // For each sequence, positions [starts[i], ends[i]) in order -> flat slot ids.
  void fill_slot_mapping(const std::vector<int64_t>& handles, const int64_t* starts, const int64_t* ends,
                         int64_t* out, int64_t out_len) const;

 private:
  struct Seq {
    std::vector<int32_t> table;
    int64_t num_tokens = 0;
    uint32_t generation = 0;
    bool live = false;
  };
  Seq& get(int64_t handle);
  const Seq& get(int64_t handle) const;
  int32_t allocate_block();
  void release_block(int32_t block);

  int64_t num_blocks_, block_size_;
  std::vector<int32_t> free_;      // LIFO free list
  std::vector<int32_t> refcount_;  // per block
  std::vector<Seq> seqs_;          // slots; reused after free
  std::vector<int64_t> free_slots_;
  std::vector<std::pair<int32_t, int32_t>> copy_ops_;
  int64_t live_ = 0;
  BlockManagerStats stats_;
};

}  // namespace citer
