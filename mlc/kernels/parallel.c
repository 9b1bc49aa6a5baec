/* Chunks of a decode product spread over a few persistent threads, without waiting on a thread that has not started.
 *
 * An OpenMP parallel region ends in a barrier: every thread of the team must arrive, so when another process holds
 * the core of one of them (a shared machine with more runnable threads than cores), the caller waits for the
 * scheduler to give that thread its core back, once per matrix product. On this 2-core machine under load that made
 * a 2-thread int4 decode pass 5x slower than a 1-thread one (benchmarks/int4_decode.py). Here the caller publishes
 * the job, claims chunks itself like any worker, and then waits only for chunks that a worker has already claimed:
 * a worker that wakes up late finds nothing left and goes back to waiting. With every core free, workers claim their
 * share as an OpenMP team would.
 *
 * A claim is one compare-and-swap on (job generation, next chunk), so a worker still on an old job can never claim a
 * chunk of the next one. Idle workers spin for SPIN_NS (decode steps issue products back to back) and then sleep on a
 * futex.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <immintrin.h>

#define MAX_WORKERS 63
#define SPIN_NS 50000

typedef void (*chunk_fn)(void *ctx, int64_t chunk);

static struct {
    _Atomic uint64_t claim;       /* generation << 32 | next unclaimed chunk */
    _Atomic uint32_t generation;  /* the futex word idle workers sleep on */
    _Atomic int64_t done;         /* chunks of the current job finished */
    _Atomic int sleepers;
    chunk_fn fn;
    void *ctx;
    int64_t chunks;
    int helpers;                  /* workers that may take part in the current job */
    int started;                  /* workers running */
    pthread_mutex_t start_lock;
    pthread_mutex_t job_lock;     /* one job at a time (several Python threads may call in) */
} pool = {.start_lock = PTHREAD_MUTEX_INITIALIZER, .job_lock = PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run chunks of generation gen until none are left (or a new job has replaced it). */
static void run_chunks(uint32_t gen) {
    for (;;) {
        uint64_t c = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((uint32_t)(c >> 32) != gen) return;
        const chunk_fn fn = pool.fn;
        void *ctx = pool.ctx;
        const int64_t chunks = pool.chunks;
        const int64_t next = (int64_t)(c & 0xffffffffu);
        if (next >= chunks) return;
        /* Succeeds only if the job is still gen: the fields read above are then gen's, and stay so while the
         * claimed chunk is unfinished (the caller publishes no new job before every chunk is done). */
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &c, c + 1, memory_order_acq_rel, memory_order_acquire)) continue;
        fn(ctx, next);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool.generation);
    for (;;) {
        uint32_t gen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (gen == seen) {
            const int64_t until = now_ns() + SPIN_NS;
            while ((gen = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
                for (int i = 0; i < 64; i++) _mm_pause();
                if (now_ns() > until) {
                    atomic_fetch_add(&pool.sleepers, 1);
                    if (atomic_load(&pool.generation) == seen)
                        syscall(SYS_futex, &pool.generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                    atomic_fetch_sub(&pool.sleepers, 1);
                }
            }
        }
        seen = gen;
        if (index < pool.helpers) run_chunks(gen);
    }
    return NULL;
}

static void start_workers(int wanted) {
    pthread_mutex_lock(&pool.start_lock);
    while (pool.started < wanted && pool.started < MAX_WORKERS) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, worker, (void *)(intptr_t)pool.started) != 0) break;
        pthread_attr_destroy(&attr);
        pool.started++;
    }
    pthread_mutex_unlock(&pool.start_lock);
}

/* fn(ctx, i) for i in 0..chunks-1, on the calling thread and up to threads - 1 workers; returns when all are done. */
void mlc_parallel_for(chunk_fn fn, void *ctx, int64_t chunks, int threads) {
    if (threads <= 1 || chunks <= 1) {
        for (int64_t i = 0; i < chunks; i++) fn(ctx, i);
        return;
    }
    if (pool.started < threads - 1) start_workers(threads - 1);
    pthread_mutex_lock(&pool.job_lock);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.chunks = chunks;
    pool.helpers = threads - 1;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    const uint32_t gen = atomic_load(&pool.generation) + 1;
    atomic_store_explicit(&pool.claim, (uint64_t)gen << 32, memory_order_release);
    atomic_store_explicit(&pool.generation, gen, memory_order_release);
    if (atomic_load(&pool.sleepers) > 0) syscall(SYS_futex, &pool.generation, FUTEX_WAKE_PRIVATE, MAX_WORKERS, NULL, NULL, 0);
    run_chunks(gen);
    /* Only chunks a running worker claimed are left: wait for those, yielding the core if one is held up. */
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < chunks; spins++) {
        if (spins < 4096) _mm_pause();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.job_lock);
}
