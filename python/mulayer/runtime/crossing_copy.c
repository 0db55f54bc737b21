/* mulayer.crossing.copy without Python on its common path (see native_crossing.py).
 *
 * The VM calls copy(src, pin, dst) for every crossing. Where one side is a CUDA tensor and the
 * other a host buffer the Python side has published a plan for (its pieces: each a DMA inside a
 * page-locked range or through a page-locked bounce page), or one lying wholly inside one
 * page-locked range (one piece), the copy is issued here, straight to the CUDA driver on the
 * default stream, and waited for: asynchronous DMAs and one stream sync (with sync_copy set, the
 * last piece a synchronous copy instead). Everything else (a buffer not locked yet, host to
 * host, a driver that refuses because this thread has no current context) goes to the
 * fallback: the Python copy in crossing.py, which locks buffers and publishes ranges and plans.
 *
 * One mutex guards the driver, the ranges, the plans and the bounce pages (shared by every
 * copy). No Python ever runs while it is held, except the test suite's fake driver: the Python
 * side changes ranges (mulayer_crossing_merge) and runs its own copies (mulayer_crossing_run)
 * through functions of this file, called through ctypes, which lets go of the GIL. A thread
 * that waits for the mutex while holding the GIL (a VM called without releasing it) so never
 * waits for a thread that needs the GIL.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

typedef int (*dtoh_async_fn)(void *host, uint64_t device, size_t size, void *stream);
typedef int (*htod_async_fn)(uint64_t device, const void *host, size_t size, void *stream);
typedef int (*dtoh_fn)(void *host, uint64_t device, size_t size);
typedef int (*htod_fn)(uint64_t device, const void *host, size_t size);
typedef int (*sync_fn)(void *stream);
typedef int (*register_fn)(void *host, size_t size, unsigned int flags);
typedef int (*unregister_fn)(void *host);

static struct {
  dtoh_async_fn dtoh_async;
  htod_async_fn htod_async;
  dtoh_fn dtoh;
  htod_fn htod;
  sync_fn sync;
  register_fn host_register;
  unregister_fn host_unregister;
} driver;

#define MAX_STEPS 8

typedef struct {
  uint64_t offset, size, bounce; /* bounce: a page-locked page of our own, or 0 (in place) */
} step_t;

typedef struct {
  uint64_t ptr, size;
  int64_t count;
  step_t steps[MAX_STEPS];
} plan_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static plan_t *plans; /* sorted by (ptr, size) */
static int64_t plan_count, plan_capacity;
static uint64_t *ranges; /* page-locked [start, end) pairs, disjoint, sorted by start */
static int64_t range_count;
static int sync_copy;
static TVMFFIObjectHandle fallback;
static uint64_t fast_calls, fallback_calls;

void mulayer_crossing_set_driver(void *dtoh_async, void *htod_async, void *dtoh, void *htod,
                                 void *sync, void *host_register, void *host_unregister) {
  pthread_mutex_lock(&lock);
  driver.dtoh_async = (dtoh_async_fn)dtoh_async;
  driver.htod_async = (htod_async_fn)htod_async;
  driver.dtoh = (dtoh_fn)dtoh;
  driver.htod = (htod_fn)htod;
  driver.sync = (sync_fn)sync;
  driver.host_register = (register_fn)host_register;
  driver.host_unregister = (unregister_fn)host_unregister;
  pthread_mutex_unlock(&lock);
}

void mulayer_crossing_set_sync_copy(int on) {
  pthread_mutex_lock(&lock);
  sync_copy = on;
  pthread_mutex_unlock(&lock);
}

/* Replace the ranges (and drop the plans: they were worked out against the old ones); call
 * with the lock held. 0, or -1 out of memory (nothing changed). */
static int replace_ranges(const uint64_t *pairs, int64_t count) {
  uint64_t *copy = count ? malloc(sizeof(uint64_t) * 2 * count) : NULL;
  if (count && !copy) return -1;
  if (count) memcpy(copy, pairs, sizeof(uint64_t) * 2 * count);
  free(ranges);
  ranges = copy;
  range_count = count;
  plan_count = 0;
  return 0;
}

/* The page-locked ranges as `count` (start, end) pairs, disjoint and sorted; the plans are
 * dropped. 0, or -1 out of memory. */
int mulayer_crossing_set_ranges(const uint64_t *pairs, int64_t count) {
  pthread_mutex_lock(&lock);
  int status = replace_ranges(pairs, count);
  pthread_mutex_unlock(&lock);
  return status;
}

/* Page-lock [start, start + size) as one range, in place of the `old_count` ranges (start, end
 * pairs) it meets, which are released first (and locked again where the driver refuses the
 * new range); then the ranges are `new_pairs`. No copy runs meanwhile. The driver's status
 * (0: locked), -1 out of memory, -3 no driver. */
int mulayer_crossing_merge(const uint64_t *old_pairs, int64_t old_count, uint64_t start,
                           uint64_t size, const uint64_t *new_pairs, int64_t new_count) {
  pthread_mutex_lock(&lock);
  int status = -3;
  if (driver.host_register && driver.host_unregister) {
    for (int64_t i = 0; i < old_count; ++i) driver.host_unregister((void *)(uintptr_t)old_pairs[2 * i]);
    status = driver.host_register((void *)(uintptr_t)start, size, 0);
    if (status != 0) { /* put the old ranges back (they were valid) */
      for (int64_t i = 0; i < old_count; ++i)
        driver.host_register((void *)(uintptr_t)old_pairs[2 * i],
                             old_pairs[2 * i + 1] - old_pairs[2 * i], 0);
    } else {
      status = replace_ranges(new_pairs, new_count);
    }
  }
  pthread_mutex_unlock(&lock);
  return status;
}

static int plan_before(const plan_t *plan, uint64_t ptr, uint64_t size) {
  return plan->ptr < ptr || (plan->ptr == ptr && plan->size < size);
}

/* The first plan not before (ptr, size); call with the lock held. */
static int64_t plan_index(uint64_t ptr, uint64_t size) {
  int64_t lo = 0, hi = plan_count;
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (plan_before(&plans[mid], ptr, size)) lo = mid + 1; else hi = mid;
  }
  return lo;
}

static int fill_plan(plan_t *plan, uint64_t ptr, uint64_t size, const uint64_t *triples,
                     int64_t count) {
  if (count < 1 || count > MAX_STEPS) return -2;
  plan->ptr = ptr;
  plan->size = size;
  plan->count = count;
  for (int64_t i = 0; i < count; ++i) {
    plan->steps[i].offset = triples[3 * i];
    plan->steps[i].size = triples[3 * i + 1];
    plan->steps[i].bounce = triples[3 * i + 2];
  }
  return 0;
}

/* The plan of a host buffer's copy: `count` steps as (offset, size, bounce) triples (replaces
 * an earlier one; dropped when the ranges change). 0, -1 out of memory, -2 too many steps. */
int mulayer_crossing_set_plan(uint64_t ptr, uint64_t size, const uint64_t *triples, int64_t count) {
  plan_t plan;
  int status = fill_plan(&plan, ptr, size, triples, count);
  if (status != 0) return status;
  pthread_mutex_lock(&lock);
  int64_t at = plan_index(ptr, size);
  if (at == plan_count || plans[at].ptr != ptr || plans[at].size != size) {
    if (plan_count == plan_capacity) {
      int64_t capacity = plan_capacity ? 2 * plan_capacity : 64;
      plan_t *grown = realloc(plans, sizeof(plan_t) * capacity);
      if (!grown) {
        pthread_mutex_unlock(&lock);
        return -1;
      }
      plans = grown;
      plan_capacity = capacity;
    }
    memmove(&plans[at + 1], &plans[at], sizeof(plan_t) * (plan_count - at));
    plan_count++;
  }
  plans[at] = plan;
  pthread_mutex_unlock(&lock);
  return 0;
}

/* The function a call this file does not handle goes to (a strong reference is kept). */
int mulayer_crossing_set_fallback(TVMFFIObjectHandle function) {
  if (function && TVMFFIObjectIncRef(function) != 0) return -1;
  pthread_mutex_lock(&lock);
  TVMFFIObjectHandle old = fallback;
  fallback = function;
  pthread_mutex_unlock(&lock);
  return old ? TVMFFIObjectDecRef(old) : 0;
}

void mulayer_crossing_counts(uint64_t *out) {
  out[0] = __atomic_load_n(&fast_calls, __ATOMIC_RELAXED);
  out[1] = __atomic_load_n(&fallback_calls, __ATOMIC_RELAXED);
}

static DLTensor *as_tensor(const TVMFFIAny *value) {
  if (value->type_index == kTVMFFIDLTensorPtr) return (DLTensor *)value->v_ptr;
  if (value->type_index == kTVMFFITensor) return (DLTensor *)((char *)value->v_obj + sizeof(TVMFFIObject));
  return NULL;
}

/* Bytes of a compact tensor, or 0 where it is strided. */
static uint64_t compact_bytes(const DLTensor *t) {
  uint64_t count = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    if (t->strides && t->shape[i] != 1 && (uint64_t)t->strides[i] != count) return 0;
    count *= (uint64_t)t->shape[i];
  }
  return (count * t->dtype.bits * t->dtype.lanes + 7) / 8;
}

static int is_host(const DLTensor *t) {
  return t->device.device_type == kDLCPU || t->device.device_type == kDLCUDAHost;
}

/* Inside one page-locked range; call with the lock held. */
static int covered(uint64_t start, uint64_t size) {
  int64_t lo = 0, hi = range_count; /* the last range starting at or before `start` */
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (ranges[2 * mid] <= start) lo = mid + 1; else hi = mid;
  }
  return lo > 0 && start + size <= ranges[2 * (lo - 1) + 1];
}

/* Issue a plan's steps and wait for them; call with the lock held (the bounce pages are
 * shared). 1 when done, 0 where there is no driver or it refused (whatever was queued is
 * waited for first: no DMA into a bounce page outlives the lock). */
static int run_steps(const plan_t *plan, char *host_ptr, uint64_t gpu_ptr, int to_host) {
  if (!driver.sync) return 0;
  int64_t last = sync_copy ? plan->count - 1 : -1;
  for (int64_t i = 0; i < plan->count; ++i) {
    const step_t *step = &plan->steps[i];
    char *host = step->bounce ? (char *)(uintptr_t)step->bounce : host_ptr + step->offset;
    uint64_t device = gpu_ptr + step->offset;
    int status;
    if (to_host) {
      status = i == last ? driver.dtoh(host, device, step->size)
                         : driver.dtoh_async(host, device, step->size, NULL);
    } else {
      if (step->bounce) memcpy(host, host_ptr + step->offset, step->size);
      status = i == last ? driver.htod(device, host, step->size)
                         : driver.htod_async(device, host, step->size, NULL);
    }
    if (status != 0) {
      if (i > 0) driver.sync(NULL);
      return 0;
    }
  }
  if (last < 0 && driver.sync(NULL) != 0) return 0;
  if (to_host) {
    for (int64_t i = 0; i < plan->count; ++i) {
      const step_t *step = &plan->steps[i];
      if (step->bounce) memcpy(host_ptr + step->offset, (char *)(uintptr_t)step->bounce, step->size);
    }
  }
  return 1;
}

/* The Python copy's steps, run as the C copy runs its own: 1 done, 0 refused (or no driver),
 * -2 too many steps. */
int mulayer_crossing_run(uint64_t host_ptr, uint64_t gpu_ptr, uint64_t size,
                         const uint64_t *triples, int64_t count, int to_host) {
  plan_t plan;
  int status = fill_plan(&plan, host_ptr, size, triples, count);
  if (status != 0) return status;
  pthread_mutex_lock(&lock);
  status = run_steps(&plan, (char *)(uintptr_t)host_ptr, gpu_ptr, to_host);
  pthread_mutex_unlock(&lock);
  return status;
}

/* 1 where the copy was done here; 0 where it is the fallback's. */
static int copy_here(const TVMFFIAny *args, int32_t num_args) {
  if (num_args != 3) return 0;
  DLTensor *src = as_tensor(&args[0]), *dst = as_tensor(&args[2]);
  if (!src || !dst) return 0;
  int to_host = is_host(dst);
  if (is_host(src) == to_host) return 0;
  DLTensor *host = to_host ? dst : src, *gpu = to_host ? src : dst;
  if (gpu->device.device_type != kDLCUDA) return 0;
  uint64_t size = compact_bytes(src);
  if (!size || size != compact_bytes(dst)) return 0;
  char *host_ptr = (char *)host->data + host->byte_offset;
  uint64_t address = (uint64_t)(uintptr_t)host_ptr;
  uint64_t gpu_ptr = (uint64_t)(uintptr_t)gpu->data + gpu->byte_offset;
  pthread_mutex_lock(&lock);
  int64_t at = plan_index(address, size);
  int planned = at < plan_count && plans[at].ptr == address && plans[at].size == size;
  const plan_t *plan = planned ? &plans[at] : NULL;
  plan_t whole = {address, size, 1, {{0, size, 0}}};
  if (!plan && covered(address, size)) plan = &whole;
  int done = plan && run_steps(plan, host_ptr, gpu_ptr, to_host);
  pthread_mutex_unlock(&lock);
  return done; /* refused (no current context here): the fallback copies it again */
}

int __tvm_ffi_copy(void *self, const TVMFFIAny *args, int32_t num_args, TVMFFIAny *result) {
  (void)self;
  if (copy_here(args, num_args)) {
    __atomic_fetch_add(&fast_calls, 1, __ATOMIC_RELAXED);
    result->type_index = kTVMFFINone;
    result->zero_padding = 0;
    result->v_int64 = 0;
    return 0;
  }
  __atomic_fetch_add(&fallback_calls, 1, __ATOMIC_RELAXED);
  pthread_mutex_lock(&lock);
  TVMFFIObjectHandle function = fallback;
  if (function) TVMFFIObjectIncRef(function);
  pthread_mutex_unlock(&lock);
  if (!function) {
    TVMFFIErrorSetRaisedFromCStr("RuntimeError", "mulayer.crossing.copy: no fallback set");
    return -1;
  }
  int status = TVMFFIFunctionCall(function, (TVMFFIAny *)args, num_args, result);
  TVMFFIObjectDecRef(function);
  return status;
}
