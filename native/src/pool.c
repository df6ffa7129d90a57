/* pool.c: a small pthread pool, created once. A job is fn(ctx, ith, nth) run on every thread:
 * n_threads - 1 workers plus the caller as thread 0. One job runs at a time. Between jobs a
 * worker spins for a while, then sleeps on a condition variable. */
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"

typedef struct {
    el_pool *pool;
    int32_t ith;
} el_worker;

struct el_pool {
    int32_t n_threads;
    pthread_t *threads;     /* [n_threads - 1] */
    el_worker *workers;     /* [n_threads - 1] */
    pthread_mutex_t run;    /* held for a whole job: concurrent callers take turns */
    pthread_mutex_t mu;     /* guards everything below */
    pthread_cond_t start, done;
    _Atomic uint64_t generation; /* bumped for each job */
    int32_t pending;        /* workers still running the current job */
    int quit;
    el_job_fn fn;
    void *ctx;
    /* el_pool_barrier: threads arrived at the current barrier, how many barriers have opened, and
     * how many threads sleep on barrier_opened */
    _Atomic int32_t barrier_arrived;
    _Atomic uint32_t barrier_opened;
    _Atomic int32_t barrier_sleepers;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* About 500 microseconds of PAUSE (see BARRIER_SPINS) before a worker sleeps on the condition
 * variable: woken from it, a worker started a decode step ~60 microseconds after the caller on
 * this project's VM (its idle vCPU halts), spinning 2-3; in a decode loop the next token's job
 * comes a few hundred microseconds after the last one ended. */
#define WORKER_SPINS 20000

static void *worker_main(void *arg) {
    el_worker *self = arg;
    el_pool *p = self->pool;
    uint64_t seen = 0;
    for (;;) {
        for (int32_t spins = 0; spins < WORKER_SPINS; spins++) {
            if (atomic_load_explicit(&p->generation, memory_order_acquire) != seen) break;
            cpu_relax();
        }
        pthread_mutex_lock(&p->mu);
        while (p->generation == seen && !p->quit) pthread_cond_wait(&p->start, &p->mu);
        if (p->quit) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = p->generation;
        el_job_fn fn = p->fn;
        void *ctx = p->ctx;
        pthread_mutex_unlock(&p->mu);

        fn(ctx, self->ith, p->n_threads);

        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->mu);
    }
}

static void stop_workers(el_pool *p, int32_t started) {
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int32_t i = 0; i < started; i++) pthread_join(p->threads[i], NULL);
}

static void free_pool(el_pool *p) {
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->run);
    free(p->threads);
    free(p->workers);
    free(p);
}

int el_pool_create(el_pool **out, int32_t n_threads) {
    if (!out || n_threads < 1 || n_threads > 1024) return EL_EINVAL;
    *out = NULL;
    el_pool *p = calloc(1, sizeof *p);
    if (!p) return EL_ENOMEM;
    p->n_threads = n_threads;
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    p->workers = calloc((size_t)n_threads, sizeof *p->workers);
    if (!p->threads || !p->workers) {
        free(p->threads);
        free(p->workers);
        free(p);
        return EL_ENOMEM;
    }
    pthread_mutex_init(&p->run, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int32_t i = 0; i < n_threads - 1; i++) {
        p->workers[i] = (el_worker){p, i + 1};
        if (pthread_create(&p->threads[i], NULL, worker_main, &p->workers[i]) != 0) {
            stop_workers(p, i);
            free_pool(p);
            return EL_ETHREAD;
        }
    }
    *out = p;
    return EL_OK;
}

void el_pool_destroy(el_pool *pool) {
    if (!pool) return;
    stop_workers(pool, pool->n_threads - 1);
    free_pool(pool);
}

int el_pool_threads(const el_pool *pool) { return pool ? pool->n_threads : 1; }

void el_pool_run(el_pool *pool, el_job_fn fn, void *ctx) {
    if (!pool || pool->n_threads == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool->run);
    pthread_mutex_lock(&pool->mu);
    pool->fn = fn;
    pool->ctx = ctx;
    pool->pending = pool->n_threads - 1;
    pool->generation++;
    pthread_cond_broadcast(&pool->start);
    pthread_mutex_unlock(&pool->mu);

    fn(ctx, 0, pool->n_threads);

    pthread_mutex_lock(&pool->mu);
    while (pool->pending > 0) pthread_cond_wait(&pool->done, &pool->mu);
    pthread_mutex_unlock(&pool->mu);
    pthread_mutex_unlock(&pool->run);
}

/* Sleep while *word == value (or return at once if it no longer is); wake every sleeper. Linux
 * futexes; elsewhere a yield, which is correct, only slower. */
static void wait_while(_Atomic uint32_t *word, uint32_t value) {
#if defined(__linux__)
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
#else
    (void)word, (void)value;
    sched_yield();
#endif
}

static void wake_all(_Atomic uint32_t *word) {
#if defined(__linux__)
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* About 50 microseconds of PAUSE: longer than the imbalance of a phase on idle cores, short enough
 * that a thread whose partner lost its core to another process gives its own core back soon. */
#define BARRIER_SPINS 2000

/* A counting barrier with a generation number: the last thread to arrive resets the count and
 * opens the barrier by bumping the generation; the others spin on it, then sleep on it (a futex).
 * Spinning makes a barrier cost about a microsecond instead of a wake-up (tens); sleeping keeps
 * a waiter from burning the core its partner needs when the machine is oversubscribed. The
 * sleepers count and the generation are sequentially consistent, so either the opener sees a
 * sleeper and wakes it, or the sleeper sees the new generation and does not sleep. */
void el_pool_barrier_then(el_pool *pool, void (*last)(void *ctx), void *ctx) {
    if (!pool || pool->n_threads == 1) {
        if (last) last(ctx);
        return;
    }
    uint32_t opened = atomic_load(&pool->barrier_opened);
    if (atomic_fetch_add(&pool->barrier_arrived, 1) == pool->n_threads - 1) {
        if (last) last(ctx); /* before the opening store: whoever sees it open sees what last wrote */
        atomic_store(&pool->barrier_arrived, 0);
        atomic_store(&pool->barrier_opened, opened + 1);
        if (atomic_load(&pool->barrier_sleepers) > 0) wake_all(&pool->barrier_opened);
        return;
    }
    for (uint32_t spins = 0; atomic_load_explicit(&pool->barrier_opened, memory_order_acquire) == opened; spins++) {
        if (spins < BARRIER_SPINS) {
            cpu_relax();
            continue;
        }
        atomic_fetch_add(&pool->barrier_sleepers, 1);
        wait_while(&pool->barrier_opened, opened);
        atomic_fetch_sub(&pool->barrier_sleepers, 1);
    }
}

