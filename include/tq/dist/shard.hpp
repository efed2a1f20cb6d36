// Which rows of each effective batch a rank reads, and the loss normalisation that makes the
// data-parallel step equal the single-GPU step up to reduction order.
//
// Positions are indices into an epoch's row order (the loader's per-epoch permutation), so they
// do not depend on the world size: resuming a run with another world size continues from the same
// position. The single-GPU trainer's optimizer step reads micro-batches [m, m') of batch_size
// rows — up to grad_accum of them, never past the epoch's end; effective_batch() reproduces that
// grouping. With W ranks, that effective batch is cut into W contiguous blocks whose sizes differ
// by at most one (shard_rows); each rank reads its block in micro-batches of at most batch_size
// rows (split_micro_batches). A rank may get no rows (an effective batch smaller than W at the
// end of an epoch): it still joins the all-reduce, with zero gradients.
//
// Loss: the single-GPU step minimises Σ CE / T (T = supervised tokens of the whole effective
// batch). Each rank computes T with global_token_count() (every rank gets the same T), divides its
// summed CE by loss_normalizer(T, W) = T / W, and the all_reduce_mean of the ranks' gradients is
// then ∇(Σ CE / T) as on one GPU; the logged step loss is mean_over_ranks(the rank's step loss).
// Exact equality holds without dropout; with LoRA dropout the masks are drawn per micro-batch
// tensor, so a different world size draws different (equally distributed) masks.
#pragma once

#include <algorithm>
#include <ostream>
#include <vector>

#include "tq/dist/communicator.hpp"

namespace tq::dist {

// Rows [begin, end).
struct RowRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool empty() const { return end <= begin; }
  bool operator==(const RowRange&) const = default;
};

inline std::ostream& operator<<(std::ostream& os, const RowRange& r) {
  return os << "[" << r.begin << ", " << r.end << ")";
}

// Rank `rank`'s block of `rows` rows split over `world` ranks: contiguous, in rank order, sizes
// differing by at most one (the first rows % world ranks take one more).
inline RowRange shard_rows(int64_t rows, int rank, int world) {
  TQ_CHECK(rows >= 0, "shard_rows: negative row count ", rows);
  TQ_CHECK(world >= 1 && rank >= 0 && rank < world, "shard_rows: rank ", rank, " is not in a world of ", world);
  const int64_t base = rows / world, extra = rows % world;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

// `range` cut into consecutive micro-batches of `max_rows` rows (the last one shorter), in order:
// for one rank that is exactly the single-process trainer's micro-batches of the step.
inline std::vector<RowRange> split_micro_batches(const RowRange& range, int64_t max_rows) {
  TQ_CHECK(max_rows > 0, "split_micro_batches: the micro-batch size must be positive, got ", max_rows);
  TQ_CHECK(range.begin >= 0 && range.end >= range.begin, "split_micro_batches: invalid range ", range);
  std::vector<RowRange> out;
  for (int64_t a = range.begin; a < range.end; a += max_rows) out.push_back({a, std::min(range.end, a + max_rows)});
  return out;
}

// One optimizer step's effective batch: micro-batches [first_micro, end_micro) of the epoch and
// the epoch positions they cover.
struct EffectiveBatch {
  int64_t first_micro = 0, end_micro = 0;
  RowRange positions;
};

// The step that starts at micro-batch `first_micro` of an epoch of `epoch_rows` rows, grouped as
// the single-GPU trainer groups it (steps never cross an epoch's end). end_micro is where the next
// step starts (== micro-batches per epoch: the epoch is over).
inline EffectiveBatch effective_batch(int64_t first_micro, int64_t epoch_rows, int64_t batch_size,
                                      int64_t grad_accum) {
  TQ_CHECK(batch_size > 0 && grad_accum > 0, "effective_batch: batch_size ", batch_size, " and grad_accum ",
           grad_accum, " must be positive");
  TQ_CHECK(epoch_rows > 0, "effective_batch: the epoch has no rows");
  const int64_t micro_per_epoch = (epoch_rows + batch_size - 1) / batch_size;
  TQ_CHECK(first_micro >= 0 && first_micro < micro_per_epoch, "effective_batch: micro-batch ", first_micro,
           " is outside the epoch's ", micro_per_epoch);
  EffectiveBatch eb;
  eb.first_micro = first_micro;
  eb.end_micro = std::min(micro_per_epoch, (first_micro / grad_accum + 1) * grad_accum);
  eb.positions = {first_micro * batch_size, std::min(eb.end_micro * batch_size, epoch_rows)};
  return eb;
}

// A rank's part of one step.
struct StepShard {
  RowRange positions;                   // this rank's block of the effective batch (epoch positions)
  std::vector<RowRange> micro_batches;  // consecutive pieces of `positions`, each ≤ batch_size rows
};

inline StepShard shard_step(const EffectiveBatch& eb, int64_t batch_size, int rank, int world) {
  const RowRange block = shard_rows(eb.positions.size(), rank, world);
  StepShard s;
  s.positions = {eb.positions.begin + block.begin, eb.positions.begin + block.end};
  s.micro_batches = split_micro_batches(s.positions, batch_size);
  return s;
}

// The divisor of a rank's summed loss: with it, the mean over the ranks of their gradients is
// the gradient of Σ CE / global_tokens over the whole effective batch.
inline double loss_normalizer(int64_t global_tokens, int world) {
  TQ_CHECK(global_tokens > 0, "loss_normalizer: the effective batch has no supervised tokens");
  TQ_CHECK(world >= 1, "loss_normalizer: world size ", world);
  return double(global_tokens) / double(world);
}

// Supervised tokens of the whole effective batch, from each rank's count (the same on every rank).
inline int64_t global_token_count(Communicator& comm, int64_t local_tokens) {
  TQ_CHECK(local_tokens >= 0, "global_token_count: negative count ", local_tokens);
  return sum_over_ranks(comm, local_tokens);
}

// The mean over the ranks of a host value (the logged step loss).
inline double mean_over_ranks(Communicator& comm, double value) {
  return sum_over_ranks(comm, value) / double(comm.size());
}

}  // namespace tq::dist
