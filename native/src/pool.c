/* pool.c: a small pthread pool, created once. A job is fn(ctx, ith, nth) run on every thread:
 * n_threads - 1 workers plus the caller as thread 0. One job runs at a time. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

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
    uint64_t generation;    /* bumped for each job */
    int32_t pending;        /* workers still running the current job */
    int quit;
    el_job_fn fn;
    void *ctx;
    /* el_pool_barrier: threads arrived at the current barrier, and how many barriers have opened */
    _Atomic int32_t barrier_arrived;
    _Atomic uint32_t barrier_opened;
};

static void *worker_main(void *arg) {
    el_worker *self = arg;
    el_pool *p = self->pool;
    uint64_t seen = 0;
    for (;;) {
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

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* A counting barrier with a generation number: the last thread to arrive resets the count and
 * opens the barrier by bumping the generation; the others spin on it. Spinning is what makes a
 * barrier cost about a microsecond rather than a condition variable's wake-up (tens); after a
 * while a waiter yields its core, so a thread that lost its CPU to another process gets it back. */
void el_pool_barrier(el_pool *pool) {
    if (!pool || pool->n_threads == 1) return;
    uint32_t opened = atomic_load_explicit(&pool->barrier_opened, memory_order_acquire);
    if (atomic_fetch_add_explicit(&pool->barrier_arrived, 1, memory_order_acq_rel) == pool->n_threads - 1) {
        atomic_store_explicit(&pool->barrier_arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&pool->barrier_opened, opened + 1, memory_order_release);
        return;
    }
    for (uint32_t spins = 0; atomic_load_explicit(&pool->barrier_opened, memory_order_acquire) == opened; spins++) {
        if (spins < 20000) cpu_relax();
        else sched_yield();
    }
}
