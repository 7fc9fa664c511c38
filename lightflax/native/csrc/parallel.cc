// The chunk runtime of parallel.h: a small pool of worker threads that take chunks of one call at
// a time, alongside the calling thread.
//
// One call (a Job) is published at a time; a call that finds the pool busy with another call (two
// XLA threads in native handlers at once) runs its chunks alone on its own thread. Workers wait for
// a call by spinning briefly (kSpinUs: the next native call usually follows within microseconds),
// then sleep on a condition variable. The caller, when no chunk is left to take, waits for the
// chunks still running the same way. Jobs are reference-counted: a worker that wakes late finds the
// job's chunks all taken and never touches the caller's (by then gone) closure.
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include "parallel.h"

namespace lf {
namespace detail {
extern thread_local int t_depth;
}
namespace {

constexpr int kMaxThreads = 64;
std::atomic<int> g_spin_us{50};  // lightflax_native_set_spin_us

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until pred() or spin_us microseconds have passed; true if pred() held.
template <class P>
bool SpinUntil(P pred) {
  const int us = g_spin_us.load(std::memory_order_relaxed);
  if (pred()) return true;
  if (us <= 0) return false;
  auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (;;) {
    for (int k = 0; k < 64; ++k) {
      if (pred()) return true;
      CpuRelax();
    }
    if (std::chrono::steady_clock::now() >= end) return pred();
  }
}

struct Job {
  int64_t chunks = 0;
  int threads = 1;  // tids < threads take part
  detail::ChunkFn fn = nullptr;
  void* ctx = nullptr;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;
  bool caller_sleeps = false;

  // Takes chunks until none is left; wakes the caller if it ran the last one while it sleeps.
  void Work(int tid) {
    ++detail::t_depth;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      fn(ctx, c, tid);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lk(mu);
        if (caller_sleeps) cv.notify_one();
      }
    }
    --detail::t_depth;
  }

  void WaitDone() {
    auto finished = [&] { return done.load(std::memory_order_acquire) == chunks; };
    if (SpinUntil(finished)) return;
    std::unique_lock<std::mutex> lk(mu);
    caller_sleeps = true;
    cv.wait(lk, finished);
  }
};

class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool();  // never destroyed: workers outlive static destruction
    return *pool;
  }

  // Runs a job on the caller (tid 0) and up to threads - 1 workers, or on the caller alone when
  // another call holds the pool.
  void Run(const std::shared_ptr<Job>& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || job->threads <= 1) {
      job->Work(0);
      return;
    }
    Grow(job->threads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      current_ = job;
      epoch_.fetch_add(1, std::memory_order_release);
      if (sleeping_ > 0) cv_.notify_all();
    }
    job->Work(0);
    job->WaitDone();
    std::lock_guard<std::mutex> lk(mu_);
    current_.reset();  // workers still holding it find no chunk left
  }

 private:
  void Grow(int workers) {
    workers = std::min(workers, kMaxThreads - 1);
    while (started_ < workers) {
      int tid = ++started_;
      std::thread([this, tid] { Loop(tid); }).detach();
    }
  }

  void Loop(int tid) {
    omp_set_num_threads(1);  // oneDNN primitives run single-threaded here
    uint64_t seen = 0;
    for (;;) {
      auto changed = [&] { return epoch_.load(std::memory_order_acquire) != seen; };
      if (!SpinUntil(changed)) {
        std::unique_lock<std::mutex> lk(mu_);
        ++sleeping_;
        cv_.wait(lk, changed);
        --sleeping_;
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = epoch_.load(std::memory_order_relaxed);
        job = current_;
      }
      if (job && tid < job->threads) job->Work(tid);
    }
  }

  std::mutex busy_;  // held by the call that owns the pool
  std::mutex mu_;    // guards current_, sleeping_; epoch_ changes under it
  std::condition_variable cv_;
  std::shared_ptr<Job> current_;
  std::atomic<uint64_t> epoch_{0};
  int sleeping_ = 0;
  int started_ = 0;  // workers started (under busy_)
};

int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
}

}  // namespace

int NumThreads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n <= 0) {
    static const int cpus = UsableCpus();
    n = cpus;
  }
  return std::min(n, kMaxThreads);
}

void EnterCall() {
  int want = g_runtime.load(std::memory_order_relaxed) == kOpenMP ? NumThreads() : 1;
  if (omp_get_max_threads() != want) omp_set_num_threads(want);
}

namespace detail {
thread_local int t_depth = 0;  // > 0 inside a chunk: a nested loop runs on its thread alone

void RunChunks(int64_t chunks, ChunkFn fn, void* ctx) {
  int threads = (int)std::min<int64_t>(NumThreads(), chunks);
  if (threads <= 1 || t_depth > 0) {
    ++t_depth;
    for (int64_t c = 0; c < chunks; ++c) fn(ctx, c, 0);
    --t_depth;
    return;
  }
  g_parallel_jobs.fetch_add(1, std::memory_order_relaxed);
  auto job = std::make_shared<Job>();
  job->chunks = chunks;
  job->threads = threads;
  job->fn = fn;
  job->ctx = ctx;
  Pool::Get().Run(job);
}
}  // namespace detail

}  // namespace lf

LF_EXPORT void lightflax_native_set_runtime(int64_t r) { lf::g_runtime = r == 1 ? lf::kOpenMP : lf::kPool; }
LF_EXPORT int64_t lightflax_native_get_runtime() { return lf::g_runtime.load(); }
LF_EXPORT void lightflax_native_set_spin_us(int64_t us) { lf::g_spin_us = (int)std::max<int64_t>(0, us); }

// Test hooks (tests/test_native_runtime.py). counts[i] += 1 for every index ParallelFor(n, grain)
// runs; returns the largest thread index seen (-1 when n == 0).
LF_EXPORT int64_t lightflax_native_parallel_check(int64_t n, int64_t grain, int64_t* counts) {
  lf::EnterCall();
  std::atomic<int> max_tid{-1};
  lf::ParallelFor(
      n,
      [&](int64_t i, int tid) {
        __atomic_fetch_add(&counts[i], 1, __ATOMIC_RELAXED);
        int seen = max_tid.load();
        while (tid > seen && !max_tid.compare_exchange_weak(seen, tid)) {
        }
      },
      grain);
  return max_tid.load();
}

// out[c] = sum over rows of x (m, c) (lf::ChannelSums).
LF_EXPORT void lightflax_native_channel_sums(const float* x, int64_t m, int64_t c, double* out) {
  lf::EnterCall();
  lf::ChannelSums(m, c, out, [&](int64_t i, int64_t k) { return x[i * c + k]; });
}
