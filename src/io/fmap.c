/* Read-only host file mappings with a SIGBUS guard (see fmap.h). */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/fmap.h"
#include "util/util.h"

#define FMAP_SLOTS 32

/* Read by the signal handler: plain atomics, no locks. */
static _Atomic uintptr_t fmap_base[FMAP_SLOTS];
static _Atomic uintptr_t fmap_end[FMAP_SLOTS];
static volatile sig_atomic_t fmap_fault;
static uintptr_t fmap_page;

static pthread_mutex_t fmap_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned fmap_users;
static struct sigaction fmap_old;

static void fmap_sigbus(int sig, siginfo_t *si, void *uc)
{
    uintptr_t a = (uintptr_t)si->si_addr;

    (void)uc;
    for (int i = 0; i < FMAP_SLOTS; i++) {
        uintptr_t b = atomic_load(&fmap_base[i]), e = atomic_load(&fmap_end[i]);
        if (b && a >= b && a < e) {
            void *page = (void *)(a & ~(fmap_page - 1));
            if (MAP_FAILED != mmap(page, fmap_page, PROT_READ,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)) {
                fmap_fault = 1;
                return;
            }
            break;
        }
    }
    /* not one of ours (or no zero page): what would have happened anyway */
    signal(sig, SIG_DFL);
}

/* Register [base, base+len) with the handler, installing it for the first
 * user: the slot, or -1. */
static int fmap_register(const uint8_t *base, uint64_t len)
{
    int slot = -1;

    pthread_mutex_lock(&fmap_lock);
    if (0 == fmap_users) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        if (sigaction(SIGBUS, NULL, &fmap_old) < 0 ||
            SIG_DFL != fmap_old.sa_handler || (fmap_old.sa_flags & SA_SIGINFO)) {
            goto out;
        }
        fmap_page = (uintptr_t)sysconf(_SC_PAGESIZE);
        sa.sa_sigaction = fmap_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, NULL) < 0) {
            goto out;
        }
    }
    for (int i = 0; i < FMAP_SLOTS; i++) {
        if (0 == atomic_load(&fmap_base[i])) {
            atomic_store(&fmap_end[i], (uintptr_t)base + len);
            atomic_store(&fmap_base[i], (uintptr_t)base);
            slot = i;
            break;
        }
    }
    if (slot >= 0) {
        fmap_users++;
    } else if (0 == fmap_users) {
        sigaction(SIGBUS, &fmap_old, NULL);
    }
out:
    pthread_mutex_unlock(&fmap_lock);
    return slot;
}

static void fmap_unregister(int slot)
{
    pthread_mutex_lock(&fmap_lock);
    atomic_store(&fmap_base[slot], 0);
    atomic_store(&fmap_end[slot], 0);
    if (0 == --fmap_users) {
        sigaction(SIGBUS, &fmap_old, NULL);
    }
    pthread_mutex_unlock(&fmap_lock);
}

int vimg_fmap_open(struct vimg_fmap *m, struct vimg_file *f)
{
    struct stat st;
    void *p;

    memset(m, 0, sizeof(*m));
    m->slot = -1;
    if (f->fd < 0 || fstat(f->fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size <= 0 ||
        (uint64_t)st.st_size > SIZE_MAX) {
        return -ENOTSUP;
    }
    p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, f->fd, 0);
    if (MAP_FAILED == p) {
        return -errno;
    }
    m->slot = fmap_register(p, (uint64_t)st.st_size);
    if (m->slot < 0) {
        munmap(p, (size_t)st.st_size);
        return -EBUSY;
    }
    m->file = f;
    m->base = p;
    m->len = (uint64_t)st.st_size;
    return 0;
}

void vimg_fmap_close(struct vimg_fmap *m)
{
    if (m->base) {
        /* unmapped first: a late fault must not find a slot for it */
        munmap((void *)m->base, (size_t)m->len);
        fmap_unregister(m->slot);
    }
    memset(m, 0, sizeof(*m));
    m->slot = -1;
}

bool vimg_fmap_resident(const struct vimg_fmap *m, uint64_t off, uint64_t len)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), start, end;
    unsigned char vec[256];

    if (!m->base || off > m->len || len > m->len - off || !len) {
        return false;
    }
    start = vimg_align_down(off, page);
    end = off + len;
    while (start < end) {
        uint64_t n = VIMG_MIN(end - start, page * sizeof(vec));
        if (mincore((void *)(m->base + start), (size_t)n, vec) < 0) {
            return false;
        }
        for (uint64_t i = 0; i < vimg_div_round_up(n, page); i++) {
            if (!(vec[i] & 1)) {
                return false;
            }
        }
        start += n;
    }
    return true;
}

/* The kernel maps cached pages around a faulting one too (fault-around,
 * 64 KiB by default): release whole windows of that size. */
#define FMAP_AROUND (64u * 1024)

/* The kernel maps cached pages around a faulting one too (fault-around,
 * 64 KiB by default): release whole windows of that size. */
#define FMAP_AROUND (64u * 1024)

void vimg_fmap_populate(const struct vimg_fmap *m, uint64_t off, uint64_t len)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t start = vimg_align_down(off, page), end;

    if (!m->base || off >= m->len) {
        return;
    }
    end = VIMG_MIN(off + len, m->len);
#ifdef MADV_POPULATE_READ
    madvise((void *)(m->base + start), (size_t)(end - start), MADV_POPULATE_READ);
#endif
}

void vimg_fmap_release(const struct vimg_fmap *m, uint64_t off, uint64_t len)
{
    uint64_t start = vimg_align_down(off, FMAP_AROUND), end;

    if (!m->base || off >= m->len) {
        return;
    }
    end = VIMG_MIN(vimg_align_down(off + len + FMAP_AROUND - 1, FMAP_AROUND), m->len);
    madvise((void *)(m->base + start), (size_t)(end - start), MADV_DONTNEED);
}

bool vimg_fmap_faulted(void)
{
    return 0 != fmap_fault;
}

void vimg_fmap_clear(void)
{
    fmap_fault = 0;
}
