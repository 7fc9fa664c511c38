// A caching layer under malloc for large blocks, preloaded (LD_PRELOAD) by lightflax's entry points.
//
// Why: XLA:CPU allocates every buffer of a compiled step (outputs and temporaries) with malloc on
// every execution and frees it afterwards. glibc serves blocks above its mmap threshold (at most
// 32 MiB; and blocks of any size from threads' arenas once their heaps shrink) with fresh pages, so
// every step faults its buffers in again, 4 KiB at a time, and the kernel zeroes each page: measured
// at 160x160, batch 32, one thread, 64,600 faults and ~130 ms of kernel time per Conv2D step of
// ~490 ms (docs/native.md, "Page faults"). TensorFlow's and PyTorch's GPU allocators keep freed
// blocks for reuse; this layer does the same for large host blocks.
//
// What: allocations of at least kMinBytes (and alignment at most a page) are served from whole
// pages of our own mmap; a freed one is kept in a cache and handed out again for a request of the
// same page-rounded size. Everything else is passed to glibc's own allocator (__libc_*), so small
// allocations behave exactly as without this layer.
//
// Memory bound: a miss (no cached block of that size) first unmaps cached blocks, oldest first,
// until live + cached + the new block fit under the highest live total seen so far (of blocks this
// layer served). So the pages held (live + cached) never exceed the largest amount that was live at
// one time, which plain malloc would also have had allocated. One exception is guarded against:
// a request arriving just before the free of a same-size block (XLA's next execution before the
// previous one's cleanup) would raise that peak for good; WaitForFree gives the free a moment.
// Memory is returned to the system when blocks are evicted or the process ends. glibc serves a
// request when the mapping fails or the table of live blocks is half full (16,384 slots).
//
// Off switch: LIGHTFLAX_REUSE_ALLOC=0 in the environment (read at the first large allocation).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

extern void* __libc_malloc(size_t);
extern void __libc_free(void*);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);

enum { kPage = 4096, kSlots = 1 << 14, kCacheMax = 4096 };
static const size_t kMinBytes = (size_t)256 << 10;

// Live blocks of ours: an open-addressing table (linear probing, 0 = empty) keyed by address.
typedef struct {
  uintptr_t ptr;
  size_t bytes;
} Slot;
static Slot g_live[kSlots];
// Freed blocks kept for reuse, in the order they were freed (oldest first).
static Slot g_cache[kCacheMax];
static int g_ncache;
static size_t g_live_bytes, g_cached_bytes, g_peak_bytes;
static uint64_t g_hits, g_misses, g_evictions, g_passed, g_waits, g_waited_hits;
static int g_enabled = -1;  // -1: not read yet
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_freed;  // signalled when a block enters the cache (CLOCK_MONOTONIC)

static void Lock(void) { pthread_mutex_lock(&g_mu); }
static void Unlock(void) { pthread_mutex_unlock(&g_mu); }
static void AtforkChild(void) { pthread_mutex_init(&g_mu, NULL); }
__attribute__((constructor)) static void Init(void) {
  pthread_condattr_t a;
  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  pthread_cond_init(&g_freed, &a);
  pthread_condattr_destroy(&a);
  pthread_atfork(Lock, Unlock, AtforkChild);
}

static int Enabled(void) {
  if (g_enabled < 0) {
    const char* v = getenv("LIGHTFLAX_REUSE_ALLOC");
    g_enabled = !(v != NULL && v[0] == '0' && v[1] == '\0');
  }
  return g_enabled;
}

static size_t Hash(uintptr_t p) { return (size_t)((p >> 12) * 0x9E3779B97F4A7C15ull >> 50) & (kSlots - 1); }

// The live slot of p, or NULL. Call under the lock.
static Slot* Find(uintptr_t p) {
  for (size_t i = Hash(p), n = 0; n < kSlots; i = (i + 1) & (kSlots - 1), ++n) {
    if (g_live[i].ptr == p) return &g_live[i];
    if (g_live[i].ptr == 0) return NULL;
  }
  return NULL;
}

// Records p as live; 0 when the table is half full (the caller then unmaps p and lets glibc serve).
static size_t g_nlive;
static int Insert(uintptr_t p, size_t bytes) {
  if (g_nlive >= kSlots / 2) return 0;
  for (size_t i = Hash(p);; i = (i + 1) & (kSlots - 1)) {
    if (g_live[i].ptr == 0) {
      ++g_nlive;
      g_live[i].ptr = p;
      g_live[i].bytes = bytes;
      return 1;
    }
  }
}

// Removes the entry at slot i, moving later entries of its probe run back (no tombstones, so a
// lookup never scans more than the run it hashes into).
static void Delete(size_t i) {
  for (size_t j = i;;) {
    j = (j + 1) & (kSlots - 1);
    if (g_live[j].ptr == 0) break;
    size_t k = Hash(g_live[j].ptr);
    if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;  // its home lies after the gap
    g_live[i] = g_live[j];
    i = j;
  }
  g_live[i].ptr = 0;
  --g_nlive;
}

static void EvictOldest(void) {
  munmap((void*)g_cache[0].ptr, g_cache[0].bytes);
  g_cached_bytes -= g_cache[0].bytes;
  memmove(g_cache, g_cache + 1, (size_t)(g_ncache - 1) * sizeof(Slot));
  --g_ncache;
  ++g_evictions;
}

// The most recently freed cached block of `bytes`, taken out of the cache; NULL if none. Under the lock.
static void* TakeCached(size_t bytes) {
  for (int i = g_ncache - 1; i >= 0; --i) {
    if (g_cache[i].bytes == bytes) {
      void* p = (void*)g_cache[i].ptr;
      memmove(g_cache + i, g_cache + i + 1, (size_t)(g_ncache - 1 - i) * sizeof(Slot));
      --g_ncache;
      g_cached_bytes -= bytes;
      return p;
    }
  }
  return NULL;
}

// Whether a freed block of `bytes` is in the cache. Under the lock.
static int HasCached(size_t bytes) {
  for (int i = 0; i < g_ncache; ++i)
    if (g_cache[i].bytes == bytes) return 1;
  return 0;
}

// Whether a block of ours of exactly `bytes` is live. Under the lock.
static int LiveOfSize(size_t bytes) {
  for (size_t i = 0; i < kSlots; ++i)
    if (g_live[i].ptr != 0 && g_live[i].bytes == bytes) return 1;
  return 0;
}

// A request that would raise the peak, for the size of a block still live, is in XLA:CPU usually
// the next execution's temporaries arriving just before the previous execution's are freed (by
// another thread, a few milliseconds later). Mapping a new block there would raise the peak and
// keep two blocks resident from then on, where plain malloc has one in use at a time. So we wait,
// briefly, for a free of that size: at most 50 us per MiB (~10 % of what faulting the block in
// costs, ~0.5 ms per MiB measured), capped at 50 ms. If none comes, a new block is mapped (the
// peak then rises: the program does hold both). Returns 1 when a block of that size is in the
// cache. Under the lock (released while waiting).
static int WaitForFree(size_t bytes) {
  ++g_waits;
  double budget_ms = (double)bytes / (1 << 20) * 0.05;
  if (budget_ms > 50.0) budget_ms = 50.0;
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  long ns = until.tv_nsec + (long)(budget_ms * 1e6);
  until.tv_sec += ns / 1000000000L;
  until.tv_nsec = ns % 1000000000L;
  for (;;) {
    if (HasCached(bytes)) return 1;
    if (pthread_cond_timedwait(&g_freed, &g_mu, &until) != 0) return HasCached(bytes);  // timed out
  }
}

// A block of `bytes` (page-rounded) pages from the cache (*reused = 1) or a new, zeroed mapping;
// NULL to let glibc serve.
static void* Take(size_t bytes, int* reused) {
  void* p = NULL;
  *reused = 0;
  Lock();
  p = TakeCached(bytes);
  if (p != NULL) {
    ++g_hits;
    *reused = 1;
  } else if (g_live_bytes + bytes > g_peak_bytes && LiveOfSize(bytes) && WaitForFree(bytes)) {
    p = TakeCached(bytes);  // see WaitForFree
    ++g_waited_hits;
    *reused = 1;
  }
  if (p == NULL) {
    ++g_misses;
    if (g_live_bytes + bytes > g_peak_bytes) g_peak_bytes = g_live_bytes + bytes;
    while (g_ncache > 0 && g_live_bytes + g_cached_bytes + bytes > g_peak_bytes) EvictOldest();
    p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      while (g_ncache > 0) EvictOldest();  // give back what we hold and try once more
      p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) p = NULL;
    }
  }
  if (p != NULL) {
    if (Insert((uintptr_t)p, bytes)) {
      g_live_bytes += bytes;
    } else {
      munmap(p, bytes);
      p = NULL;
    }
  }
  if (p == NULL) ++g_passed;
  Unlock();
  return p;
}

static size_t Rounded(size_t n) { return (n + kPage - 1) & ~(size_t)(kPage - 1); }

static int Ours(size_t n, size_t align) { return n >= kMinBytes && align <= kPage && n < ((size_t)1 << 46) && Enabled(); }

// Our blocks start on a page; glibc's small blocks almost never do, so most frees skip the lock.
static int MaybeOurs(const void* p) { return ((uintptr_t)p & (kPage - 1)) == 0; }

// The block's size when p is ours (and forgets it as live), else 0. Caches the block when `keep`.
static size_t Release(void* p, int keep) {
  if (!MaybeOurs(p)) return 0;
  size_t bytes = 0;
  Lock();
  Slot* s = Find((uintptr_t)p);
  if (s != NULL) {
    bytes = s->bytes;
    Delete((size_t)(s - g_live));
    g_live_bytes -= bytes;
    if (keep) {
      if (g_ncache == kCacheMax) EvictOldest();
      g_cache[g_ncache].ptr = (uintptr_t)p;
      g_cache[g_ncache].bytes = bytes;
      ++g_ncache;
      g_cached_bytes += bytes;
      pthread_cond_broadcast(&g_freed);
    }
  }
  Unlock();
  return bytes;
}

static size_t OurSize(void* p) {
  if (!MaybeOurs(p)) return 0;
  size_t bytes = 0;
  Lock();
  Slot* s = Find((uintptr_t)p);
  if (s != NULL) bytes = s->bytes;
  Unlock();
  return bytes;
}

void* malloc(size_t n) {
  int reused;
  if (Ours(n, 0)) {
    void* p = Take(Rounded(n), &reused);
    if (p != NULL) return p;
  }
  return __libc_malloc(n);
}

void free(void* p) {
  if (p == NULL) return;
  if (Release(p, 1) == 0) __libc_free(p);
}

void* calloc(size_t a, size_t b) {
  size_t n;
  if (__builtin_mul_overflow(a, b, &n)) {
    errno = ENOMEM;
    return NULL;
  }
  int reused;
  if (Ours(n, 0)) {
    void* p = Take(Rounded(n), &reused);
    if (p != NULL) {
      if (reused) memset(p, 0, n);  // a new mapping is zero already
      return p;
    }
  }
  return __libc_calloc(a, b);
}

// glibc's own malloc_usable_size for one of its blocks (looked up once).
static size_t GlibcUsable(void* p) {
  static size_t (*usable)(void*);
  if (usable == NULL) usable = (size_t(*)(void*))dlsym(RTLD_NEXT, "malloc_usable_size");
  return usable != NULL ? usable(p) : 0;
}

void* realloc(void* p, size_t n) {
  if (p == NULL) return malloc(n);
  size_t old = OurSize(p);
  if (old == 0) {
    if (!Ours(n, 0)) return __libc_realloc(p, n);
    void* q = malloc(n);  // a glibc block grows into one of ours
    if (q == NULL) return NULL;
    size_t have = GlibcUsable(p);
    memcpy(q, p, have < n ? have : n);
    __libc_free(p);
    return q;
  }
  if (n == 0) {
    free(p);
    return NULL;
  }
  if (Rounded(n) == old) return p;
  void* q = malloc(n);
  if (q == NULL) return NULL;
  memcpy(q, p, old < n ? old : n);
  free(p);
  return q;
}

static void* Aligned(size_t align, size_t n) {
  int reused;
  if (Ours(n, align)) {
    void* p = Take(Rounded(n), &reused);
    if (p != NULL) return p;
  }
  return __libc_memalign(align, n);
}

int posix_memalign(void** out, size_t align, size_t n) {
  if (align < sizeof(void*) || (align & (align - 1)) != 0) return EINVAL;
  void* p = Aligned(align, n);
  if (p == NULL && n != 0) return ENOMEM;
  *out = p;
  return 0;
}

void* aligned_alloc(size_t align, size_t n) { return Aligned(align, n); }
void* memalign(size_t align, size_t n) { return Aligned(align, n); }

size_t malloc_usable_size(void* p) {
  if (p == NULL) return 0;
  size_t bytes = OurSize(p);
  if (bytes != 0) return bytes;
  return GlibcUsable(p);
}

// Counters for lightflax (read with ctypes): hits, misses, evictions, passed to glibc, then live,
// cached and peak bytes, the number of live blocks, waits for a free and the waits that ended in reuse.
void lightflax_reuse_alloc_stats(uint64_t* out) {
  Lock();
  out[0] = g_hits;
  out[1] = g_misses;
  out[2] = g_evictions;
  out[3] = g_passed;
  out[4] = g_live_bytes;
  out[5] = g_cached_bytes;
  out[6] = g_peak_bytes;
  out[7] = g_nlive;
  out[8] = g_waits;
  out[9] = g_waited_hits;
  Unlock();
}

int lightflax_reuse_alloc_enabled(void) { return Enabled(); }
