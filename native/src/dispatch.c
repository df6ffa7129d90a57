/* dispatch.c: which variant runs. The one global of the library: the dispatch table pointer,
 * chosen once from the CPU (cpuid/xgetbv on x86-64, getauxval on aarch64) or EDGELLM_KERNELS. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>

static uint64_t xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

/* The CPU has the instructions AND the OS saves the registers (XCR0) on context switches. */
static int cpu_has(const char *name) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return 0;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return 0; /* XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    /* leaf 1: every AVX2 CPU since Haswell and Zen has FMA and F16C; the variants use them (F16C
     * converts the float16 block scales) */
    int fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = ((b >> 5) & 1) && fma && f16c;
    if (strcmp(name, "avx2") == 0) return avx2;
    if (strcmp(name, "avx512vnni") == 0) {
        int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
        int zmm_state = (xcr0 & 0xE0) == 0xE0; /* opmask, upper ZMM0-15, ZMM16-31 */
        return avx2 && f && bw && vl && vnni && zmm_state;
    }
    return 0;
}

static const el_kernels *const VARIANTS[] = {&el_kernels_ref, &el_kernels_avx2, &el_kernels_avx512vnni};

#elif defined(__aarch64__)
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif

static int cpu_has(const char *name) {
    if (strcmp(name, "neon") == 0) return 1; /* ASIMD is part of the aarch64 base */
#if defined(__linux__)
    unsigned long hwcap = getauxval(AT_HWCAP), hwcap2 = getauxval(AT_HWCAP2);
    if (strcmp(name, "dotprod") == 0) return (hwcap & HWCAP_ASIMDDP) != 0;
    if (strcmp(name, "i8mm") == 0) return (hwcap & HWCAP_ASIMDDP) && (hwcap2 & HWCAP2_I8MM);
#endif
    return 0;
}

static const el_kernels *const VARIANTS[] = {&el_kernels_ref, &el_kernels_neon, &el_kernels_dotprod, &el_kernels_i8mm};

#else
static int cpu_has(const char *name) { (void)name; return 0; }
static const el_kernels *const VARIANTS[] = {&el_kernels_ref};
#endif

#define N_VARIANTS ((int32_t)(sizeof VARIANTS / sizeof VARIANTS[0]))

static const el_kernels *g_kernels; /* the dispatch table: NULL until el_init, or after a bad forced name */
static int g_init_status;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static int supported(const el_kernels *k) { return k == &el_kernels_ref || cpu_has(k->name); }

static const el_kernels *find(const char *name) {
    for (int32_t i = 0; i < N_VARIANTS; i++)
        if (strcmp(VARIANTS[i]->name, name) == 0) return VARIANTS[i];
    return NULL;
}

static void choose(void) {
    const char *forced = getenv("EDGELLM_KERNELS");
    if (forced && *forced) {
        const el_kernels *k = find(forced);
        g_init_status = (k && supported(k)) ? EL_OK : EL_EUNSUPPORTED;
        g_kernels = g_init_status == EL_OK ? k : NULL;
        return;
    }
    for (int32_t i = N_VARIANTS - 1; i >= 0; i--)
        if (supported(VARIANTS[i])) {
            g_kernels = VARIANTS[i];
            break;
        }
    g_init_status = EL_OK;
}

int el_init(void) {
    pthread_once(&g_once, choose);
    return g_init_status;
}

const el_kernels *el_kernels_current(void) {
    el_init();
    return g_kernels;
}

const char *el_variant(void) {
    const el_kernels *k = el_kernels_current();
    return k ? k->name : "none";
}

int el_available_variants(const char **names, int32_t capacity) {
    int32_t count = 0;
    for (int32_t i = 0; i < N_VARIANTS; i++)
        if (supported(VARIANTS[i])) {
            if (names && count < capacity) names[count] = VARIANTS[i]->name;
            count++;
        }
    return count;
}

int el_set_variant(const char *name) {
    if (!name) return EL_EINVAL;
    el_init();
    const el_kernels *k = find(name);
    if (!k || !supported(k)) return EL_EUNSUPPORTED;
    g_kernels = k;
    return EL_OK;
}
