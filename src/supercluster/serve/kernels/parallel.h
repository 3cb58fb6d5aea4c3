// Work split over PyTorch's intra-op (OpenMP) threads on demand. at::parallel_for cuts a range into
// one fixed share per thread, so a step waits for its slowest thread; on a machine whose cores also
// serve HTTP, the thread sharing a core with the server's event loop is always the slow one. Here
// each thread takes the next chunk when it is done with its last, and a busy core simply gets fewer.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace supercluster_kernels {

// f(begin, end) over [0, n) in chunks of `chunk`, on as many threads as PyTorch runs (one when
// called from inside a parallel region).
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) f(0, n);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
}

}  // namespace supercluster_kernels
