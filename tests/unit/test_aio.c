/*
 * Asynchronous I/O: the same behaviour tests run against every backend
 * that can be created on this host; a backend the host refuses (no
 * io_uring in a sandbox, no native AIO) has its group skipped, and the
 * program exits 77 when nothing could run.
 *
 * VIMG_AIO=uring|libaio|threads runs only that backend's group, created
 * through VIMG_AIO_AUTO so that the environment override is what picks it.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <setjmp.h>
#include <cmocka.h>

#include "io/aio.h"

#define TEST_DEPTH 16u

/* The backend the running group tests, and how to create it. */
static enum vimg_aio_backend cur_create_as;
static const char *cur_name;

struct fixture {
    struct vimg_aio *aio;
    int fd;
    char path[PATH_MAX];
};

/* One request and what its callback saw. */
struct tio {
    struct vimg_aio_req req;
    int result;
    int calls;
};

static void tio_cb(struct vimg_aio_req *req, int result)
{
    struct tio *t = req->opaque;

    t->result = result;
    t->calls++;
}

static void tio_init(struct tio *t, enum vimg_aio_op op, int fd, void *buf,
                     size_t len, uint64_t off)
{
    memset(t, 0, sizeof(*t));
    t->req.op = op;
    t->req.fd = fd;
    t->req.buf = buf;
    t->req.len = len;
    t->req.off = off;
    t->req.cb = tio_cb;
    t->req.opaque = t;
    t->result = INT_MIN;
}

static const char *tmp_dir(void)
{
    const char *dir = getenv("VIMG_TEST_TMP");

    return dir && *dir ? dir : "/tmp";
}

/* mkdir -p */
static int make_dir(const char *dir)
{
    char buf[PATH_MAX];
    size_t i, len = strlen(dir);

    if (len >= sizeof(buf)) {
        return -ENAMETOOLONG;
    }
    memcpy(buf, dir, len + 1);
    for (i = 1; i <= len; i++) {
        if (buf[i] == '/' || buf[i] == '\0') {
            char c = buf[i];

            buf[i] = '\0';
            if (mkdir(buf, 0700) < 0 && errno != EEXIST) {
                return -errno;
            }
            buf[i] = c;
        }
    }
    return 0;
}

static int tmp_file(char *path, size_t size)
{
    int fd;

    assert_int_equal(make_dir(tmp_dir()), 0);
    assert_true(snprintf(path, size, "%s/test_aio-XXXXXX", tmp_dir()) < (int)size);
    fd = mkstemp(path);
    assert_true(fd >= 0);
    return fd;
}

static int fixture_setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));

    assert_non_null(fx);
    fx->fd = tmp_file(fx->path, sizeof(fx->path));
    assert_int_equal(vimg_aio_new(&fx->aio, cur_create_as, TEST_DEPTH), 0);
    assert_string_equal(vimg_aio_backend_name(fx->aio), cur_name);
    *state = fx;
    return 0;
}

static int fixture_teardown(void **state)
{
    struct fixture *fx = *state;

    vimg_aio_free(fx->aio);
    close(fx->fd);
    unlink(fx->path);
    free(fx);
    return 0;
}

static void fill_pattern(uint8_t *buf, size_t len, unsigned seed)
{
    size_t i;

    for (i = 0; i < len; i++) {
        buf[i] = (uint8_t)(seed * 31u + i * 7u + (i >> 8));
    }
}

static bool all_bytes(const uint8_t *buf, size_t len, uint8_t val)
{
    size_t i;

    for (i = 0; i < len; i++) {
        if (buf[i] != val) {
            return false;
        }
    }
    return true;
}

/* Submit, making room by reaping when the queue is full. */
static void submit_retry(struct vimg_aio *aio, struct tio *t)
{
    int ret;

    while ((ret = vimg_aio_submit(aio, &t->req)) == -EAGAIN) {
        assert_true(vimg_aio_reap(aio, 1) >= 1);
    }
    assert_int_equal(ret, 0);
}

static void drain(struct vimg_aio *aio)
{
    while (vimg_aio_in_flight(aio) > 0) {
        assert_true(vimg_aio_reap(aio, 1) >= 1);
    }
    assert_int_equal(vimg_aio_reap(aio, 0), 0);
}

static void run_one(struct vimg_aio *aio, struct tio *t)
{
    assert_int_equal(vimg_aio_submit(aio, &t->req), 0);
    drain(aio);
    assert_int_equal(t->calls, 1);
}

static void write_whole(int fd, const void *buf, size_t len, off_t off)
{
    assert_int_equal(pwrite(fd, buf, len, off), (ssize_t)len);
}

#define PATTERN_REQS 96u
#define PATTERN_STRIDE 9000u

static size_t pattern_len(unsigned i)
{
    return 4096 + (i * 523u) % 3000u;
}

static uint64_t pattern_off(unsigned i)
{
    /* Unaligned offsets, not in order, with gaps between requests. */
    unsigned slot = (i * 37u) % PATTERN_REQS;

    return (uint64_t)slot * PATTERN_STRIDE + (i % 7u) * 3u;
}

static void test_aio_pattern_depth16(void **state)
{
    struct fixture *fx = *state;
    struct tio *tios = calloc(PATTERN_REQS, sizeof(*tios));
    uint8_t **wbuf = calloc(PATTERN_REQS, sizeof(*wbuf));
    uint8_t **rbuf = calloc(PATTERN_REQS, sizeof(*rbuf));
    uint8_t *check = malloc(8192);
    unsigned i, max_in_flight = 0;

    assert_non_null(tios);
    assert_non_null(wbuf);
    assert_non_null(rbuf);
    assert_non_null(check);
    for (i = 0; i < PATTERN_REQS; i++) {
        wbuf[i] = malloc(pattern_len(i));
        rbuf[i] = malloc(pattern_len(i));
        assert_non_null(wbuf[i]);
        assert_non_null(rbuf[i]);
        fill_pattern(wbuf[i], pattern_len(i), i);
        memset(rbuf[i], 0xee, pattern_len(i));
    }

    for (i = 0; i < PATTERN_REQS; i++) {
        tio_init(&tios[i], VIMG_AIO_WRITE, fx->fd, wbuf[i], pattern_len(i),
                 pattern_off(i));
        submit_retry(fx->aio, &tios[i]);
        if (vimg_aio_in_flight(fx->aio) > max_in_flight) {
            max_in_flight = vimg_aio_in_flight(fx->aio);
        }
    }
    drain(fx->aio);
    assert_int_equal(max_in_flight, TEST_DEPTH);
    for (i = 0; i < PATTERN_REQS; i++) {
        assert_int_equal(tios[i].calls, 1);
        assert_int_equal(tios[i].result, 0);
        /* What landed on disk, read without the backend under test. */
        assert_int_equal(pread(fx->fd, check, pattern_len(i), (off_t)pattern_off(i)),
                         (ssize_t)pattern_len(i));
        assert_memory_equal(check, wbuf[i], pattern_len(i));
    }

    for (i = 0; i < PATTERN_REQS; i++) {
        tio_init(&tios[i], VIMG_AIO_READ, fx->fd, rbuf[i], pattern_len(i),
                 pattern_off(i));
        submit_retry(fx->aio, &tios[i]);
    }
    drain(fx->aio);
    for (i = 0; i < PATTERN_REQS; i++) {
        assert_int_equal(tios[i].calls, 1);
        assert_int_equal(tios[i].result, 0);
        assert_memory_equal(rbuf[i], wbuf[i], pattern_len(i));
    }

    for (i = 0; i < PATTERN_REQS; i++) {
        free(wbuf[i]);
        free(rbuf[i]);
    }
    free(check);
    free(rbuf);
    free(wbuf);
    free(tios);
}

static void test_aio_short_read_eof_zero_fills(void **state)
{
    struct fixture *fx = *state;
    uint8_t data[1000];
    uint8_t buf[8192];
    struct tio t;

    fill_pattern(data, sizeof(data), 5);
    write_whole(fx->fd, data, sizeof(data), 0);

    memset(buf, 0xaa, sizeof(buf));
    tio_init(&t, VIMG_AIO_READ, fx->fd, buf, sizeof(buf), 0);
    run_one(fx->aio, &t);
    assert_int_equal(t.result, 0);
    assert_memory_equal(buf, data, sizeof(data));
    assert_true(all_bytes(buf + sizeof(data), sizeof(buf) - sizeof(data), 0));

    /* Starting past the end: nothing to read, all zeros. */
    memset(buf, 0xaa, sizeof(buf));
    tio_init(&t, VIMG_AIO_READ, fx->fd, buf, 4096, 1u << 20);
    run_one(fx->aio, &t);
    assert_int_equal(t.result, 0);
    assert_true(all_bytes(buf, 4096, 0));
    assert_true(all_bytes(buf + 4096, sizeof(buf) - 4096, 0xaa));
}

static void test_aio_zero_range_reads_zero(void **state)
{
    struct fixture *fx = *state;
    /* Longer than one chunk of the zero-writing fallback. */
    const size_t size = 1024 * 1024;
    const uint64_t zoff = 4096 + 100;
    const size_t zlen = 600000;
    uint8_t *data = malloc(size);
    uint8_t *buf = malloc(size);
    struct stat st;
    struct tio t;

    assert_non_null(data);
    assert_non_null(buf);
    fill_pattern(data, size, 9);
    write_whole(fx->fd, data, size, 0);

    tio_init(&t, VIMG_AIO_ZERO, fx->fd, NULL, zlen, zoff);
    run_one(fx->aio, &t);
    assert_int_equal(t.result, 0);

    memset(buf, 0xaa, size);
    tio_init(&t, VIMG_AIO_READ, fx->fd, buf, size, 0);
    run_one(fx->aio, &t);
    assert_int_equal(t.result, 0);
    assert_memory_equal(buf, data, zoff);
    assert_true(all_bytes(buf + zoff, zlen, 0));
    assert_memory_equal(buf + zoff + zlen, data + zoff + zlen, size - zoff - zlen);
    assert_int_equal(fstat(fx->fd, &st), 0);
    assert_int_equal(st.st_size, (off_t)size);

    /* An empty range is a no-op that still completes. */
    tio_init(&t, VIMG_AIO_ZERO, fx->fd, NULL, 0, 0);
    run_one(fx->aio, &t);
    assert_int_equal(t.result, 0);

    free(buf);
    free(data);
}

static void test_aio_fsync_completes(void **state)
{
    struct fixture *fx = *state;
    uint8_t data[4096];
    struct tio w, f;

    fill_pattern(data, sizeof(data), 3);
    tio_init(&w, VIMG_AIO_WRITE, fx->fd, data, sizeof(data), 0);
    run_one(fx->aio, &w);
    assert_int_equal(w.result, 0);

    tio_init(&f, VIMG_AIO_FSYNC, fx->fd, NULL, 0, 0);
    run_one(fx->aio, &f);
    assert_int_equal(f.result, 0);
}

static void test_aio_submit_eagain_when_full(void **state)
{
    struct fixture *fx = *state;
    static uint8_t bufs[TEST_DEPTH + 1][512];
    struct tio tios[TEST_DEPTH + 1];
    unsigned i;
    int n = 0;

    for (i = 0; i < TEST_DEPTH + 1; i++) {
        tio_init(&tios[i], VIMG_AIO_READ, fx->fd, bufs[i], sizeof(bufs[i]), i * 512u);
    }
    for (i = 0; i < TEST_DEPTH; i++) {
        assert_int_equal(vimg_aio_submit(fx->aio, &tios[i].req), 0);
    }
    assert_int_equal(vimg_aio_in_flight(fx->aio), TEST_DEPTH);
    assert_int_equal(vimg_aio_submit(fx->aio, &tios[TEST_DEPTH].req), -EAGAIN);
    assert_int_equal(tios[TEST_DEPTH].calls, 0);
    assert_int_equal(vimg_aio_in_flight(fx->aio), TEST_DEPTH);

    /* Asking for more than is in flight must not block. */
    while (vimg_aio_in_flight(fx->aio) > 0) {
        int ret = vimg_aio_reap(fx->aio, 2 * TEST_DEPTH);

        assert_true(ret >= 1);
        n += ret;
    }
    assert_int_equal(n, TEST_DEPTH);

    /* Room again. */
    run_one(fx->aio, &tios[TEST_DEPTH]);
    assert_int_equal(tios[TEST_DEPTH].result, 0);
    for (i = 0; i < TEST_DEPTH; i++) {
        assert_int_equal(tios[i].calls, 1);
        assert_int_equal(tios[i].result, 0);
    }
}

static void test_aio_bad_fd_reports_ebadf(void **state)
{
    struct fixture *fx = *state;
    static const enum vimg_aio_op ops[] = {
        VIMG_AIO_READ, VIMG_AIO_WRITE, VIMG_AIO_ZERO, VIMG_AIO_FSYNC,
    };
    uint8_t buf[4][512];
    struct tio tios[4];
    int bad_fd;
    unsigned i;

    /* A number that was a file a moment ago and now is none. */
    bad_fd = dup(fx->fd);
    assert_true(bad_fd >= 0);
    close(bad_fd);
    assert_int_equal(fcntl(bad_fd, F_GETFD), -1);

    memset(buf, 0x55, sizeof(buf));
    for (i = 0; i < 4; i++) {
        tio_init(&tios[i], ops[i], bad_fd, buf[i], sizeof(buf[i]), 0);
        assert_int_equal(vimg_aio_submit(fx->aio, &tios[i].req), 0);
    }
    drain(fx->aio);
    for (i = 0; i < 4; i++) {
        assert_int_equal(tios[i].calls, 1);
        assert_int_equal(tios[i].result, -EBADF);
    }
}

static void test_aio_zero_length_completes(void **state)
{
    struct fixture *fx = *state;
    struct tio r, w;

    tio_init(&r, VIMG_AIO_READ, fx->fd, NULL, 0, 0);
    tio_init(&w, VIMG_AIO_WRITE, fx->fd, NULL, 0, 4096);
    assert_int_equal(vimg_aio_submit(fx->aio, &r.req), 0);
    assert_int_equal(vimg_aio_submit(fx->aio, &w.req), 0);
    drain(fx->aio);
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.result, 0);
    assert_int_equal(w.calls, 1);
    assert_int_equal(w.result, 0);
}

static void test_aio_invalid_requests_rejected(void **state)
{
    struct fixture *fx = *state;
    struct vimg_aio *aio = NULL;
    uint8_t buf[16];
    struct tio t;

    assert_int_equal(vimg_aio_new(&aio, cur_create_as, 0), -EINVAL);
    assert_null(aio);

    tio_init(&t, VIMG_AIO_READ, fx->fd, buf, sizeof(buf), 0);
    t.req.cb = NULL;
    assert_int_equal(vimg_aio_submit(fx->aio, &t.req), -EINVAL);

    tio_init(&t, VIMG_AIO_READ, fx->fd, NULL, sizeof(buf), 0);
    assert_int_equal(vimg_aio_submit(fx->aio, &t.req), -EINVAL);

    tio_init(&t, VIMG_AIO_WRITE, fx->fd, buf, sizeof(buf), (uint64_t)INT64_MAX);
    assert_int_equal(vimg_aio_submit(fx->aio, &t.req), -EINVAL);

    tio_init(&t, VIMG_AIO_READ, fx->fd, buf, sizeof(buf), 0);
    t.req.op = (enum vimg_aio_op)42;
    assert_int_equal(vimg_aio_submit(fx->aio, &t.req), -EINVAL);

    assert_int_equal(vimg_aio_in_flight(fx->aio), 0);
    assert_int_equal(t.calls, 0);
}

/* Each completion submits the next write: callbacks may submit. */
struct chain {
    struct tio t;
    struct vimg_aio *aio;
    uint8_t *data;
    unsigned next, total, completed;
    int first_error;
};

#define CHAIN_BLOCK 512u

static void chain_cb(struct vimg_aio_req *req, int result)
{
    struct chain *c = req->opaque;

    c->completed++;
    if (result < 0 && c->first_error == 0) {
        c->first_error = result;
    }
    if (c->next < c->total) {
        req->buf = c->data + (size_t)c->next * CHAIN_BLOCK;
        req->off = (uint64_t)c->next * CHAIN_BLOCK;
        c->next++;
        if (vimg_aio_submit(c->aio, req) < 0 && c->first_error == 0) {
            c->first_error = -EIO;
        }
    }
}

static void test_aio_callback_may_resubmit(void **state)
{
    struct fixture *fx = *state;
    struct chain c;
    uint8_t *check;

    memset(&c, 0, sizeof(c));
    c.aio = fx->aio;
    c.total = 32;
    c.data = malloc((size_t)c.total * CHAIN_BLOCK);
    check = malloc((size_t)c.total * CHAIN_BLOCK);
    assert_non_null(c.data);
    assert_non_null(check);
    fill_pattern(c.data, (size_t)c.total * CHAIN_BLOCK, 11);

    tio_init(&c.t, VIMG_AIO_WRITE, fx->fd, c.data, CHAIN_BLOCK, 0);
    c.t.req.cb = chain_cb;
    c.t.req.opaque = &c;
    c.next = 1;
    assert_int_equal(vimg_aio_submit(fx->aio, &c.t.req), 0);
    drain(fx->aio);

    assert_int_equal(c.first_error, 0);
    assert_int_equal(c.completed, c.total);
    assert_int_equal(pread(fx->fd, check, (size_t)c.total * CHAIN_BLOCK, 0),
                     (ssize_t)(c.total * CHAIN_BLOCK));
    assert_memory_equal(check, c.data, (size_t)c.total * CHAIN_BLOCK);
    free(check);
    free(c.data);
}

static void test_aio_poll_fd_signals_completion(void **state)
{
    struct fixture *fx = *state;
    int pfd = vimg_aio_poll_fd(fx->aio);
    uint8_t buf[4096];
    struct tio t;
    int tries, got = 0;

    assert_true(pfd >= 0);
    tio_init(&t, VIMG_AIO_READ, fx->fd, buf, sizeof(buf), 0);
    assert_int_equal(vimg_aio_submit(fx->aio, &t.req), 0);
    /* Starts the request without waiting for it (a backend whose submit
     * is synchronous may also complete it here). */
    got = vimg_aio_reap(fx->aio, 0);
    assert_true(got >= 0);

    /* Readiness may be spurious (reap then finds nothing), never missing:
     * poll would time out. */
    for (tries = 0; t.calls == 0 && tries < 100; tries++) {
        struct pollfd p = { .fd = pfd, .events = POLLIN };
        int ret;

        assert_int_equal(poll(&p, 1, 10000), 1);
        assert_true(p.revents & POLLIN);
        ret = vimg_aio_reap(fx->aio, 0);
        assert_true(ret >= 0);
        got += ret;
    }
    assert_int_equal(t.calls, 1);
    assert_int_equal(got, 1);
    assert_int_equal(t.result, 0);
    assert_int_equal(vimg_aio_in_flight(fx->aio), 0);
}

static void test_aio_direct_io_unaligned_eof(void **state)
{
    struct fixture *fx = *state;
    const size_t blk = 4096;
    uint8_t *wbuf, *rbuf;
    void *mem = NULL;
    struct tio t;
    int dfd;

    dfd = open(fx->path, O_RDWR | O_DIRECT);
    if (dfd < 0) {
        /* tmpfs before 6.6 and some others refuse O_DIRECT. */
        assert_int_equal(errno, EINVAL);
        skip();
    }
    assert_int_equal(posix_memalign(&mem, blk, 4 * blk), 0);
    wbuf = mem;
    assert_int_equal(posix_memalign(&mem, blk, 4 * blk), 0);
    rbuf = mem;
    fill_pattern(wbuf, 3 * blk, 21);

    tio_init(&t, VIMG_AIO_WRITE, dfd, wbuf, 3 * blk, 0);
    run_one(fx->aio, &t);
    assert_int_equal(t.result, 0);

    /* A file that does not end on a block: the read ends short, and the
     * rest must come back as zeros, not as EINVAL. */
    assert_int_equal(ftruncate(fx->fd, 2 * blk + 100), 0);
    memset(rbuf, 0xaa, 4 * blk);
    tio_init(&t, VIMG_AIO_READ, dfd, rbuf, 4 * blk, 0);
    run_one(fx->aio, &t);
    assert_int_equal(t.result, 0);
    assert_memory_equal(rbuf, wbuf, 2 * blk + 100);
    assert_true(all_bytes(rbuf + 2 * blk + 100, 2 * blk - 100, 0));

    tio_init(&t, VIMG_AIO_FSYNC, dfd, NULL, 0, 0);
    run_one(fx->aio, &t);
    assert_int_equal(t.result, 0);

    close(dfd);
    free(rbuf);
    free(wbuf);
}

/* Freeing with requests in flight waits for the I/O but runs no callback;
 * ASan catches a backend still touching the buffers freed afterwards. */
static void test_aio_free_with_requests_in_flight(void **state)
{
    struct fixture *fx = *state;
    struct tio tios[TEST_DEPTH];
    uint8_t *bufs[TEST_DEPTH];
    unsigned i;

    for (i = 0; i < TEST_DEPTH; i++) {
        bufs[i] = malloc(64 * 1024);
        assert_non_null(bufs[i]);
        fill_pattern(bufs[i], 64 * 1024, i);
        tio_init(&tios[i], i % 2 ? VIMG_AIO_READ : VIMG_AIO_WRITE, fx->fd,
                 bufs[i], 64 * 1024, (uint64_t)i * 64 * 1024);
        assert_int_equal(vimg_aio_submit(fx->aio, &tios[i].req), 0);
    }
    vimg_aio_free(fx->aio);
    fx->aio = NULL;
    for (i = 0; i < TEST_DEPTH; i++) {
        assert_int_equal(tios[i].calls, 0);
        free(bufs[i]);
    }
}

/* Not per backend: AUTO and the VIMG_AIO override. */
static void test_aio_env_overrides_auto(void **state)
{
    const char *orig = getenv("VIMG_AIO");
    char *saved = orig ? strdup(orig) : NULL;
    struct vimg_aio *aio = NULL;

    (void)state;
    assert_int_equal(setenv("VIMG_AIO", "threads", 1), 0);
    assert_int_equal(vimg_aio_new(&aio, VIMG_AIO_AUTO, 4), 0);
    assert_string_equal(vimg_aio_backend_name(aio), "threads");
    vimg_aio_free(aio);

    assert_int_equal(setenv("VIMG_AIO", "no-such-backend", 1), 0);
    assert_int_equal(vimg_aio_new(&aio, VIMG_AIO_AUTO, 4), -EINVAL);
    assert_null(aio);

    /* The override is for AUTO only: an explicit choice stands. */
    assert_int_equal(vimg_aio_new(&aio, VIMG_AIO_THREADS, 4), 0);
    assert_string_equal(vimg_aio_backend_name(aio), "threads");
    vimg_aio_free(aio);

    /* AUTO without override: io_uring, or threads where it is refused. */
    assert_int_equal(unsetenv("VIMG_AIO"), 0);
    assert_int_equal(vimg_aio_new(&aio, VIMG_AIO_AUTO, 4), 0);
    assert_true(strcmp(vimg_aio_backend_name(aio), "io_uring") == 0 ||
                strcmp(vimg_aio_backend_name(aio), "threads") == 0);
    vimg_aio_free(aio);

    if (saved) {
        setenv("VIMG_AIO", saved, 1);
        free(saved);
    }
}

static const struct CMUnitTest backend_tests[] = {
    cmocka_unit_test_setup_teardown(test_aio_pattern_depth16,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_short_read_eof_zero_fills,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_zero_range_reads_zero,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_fsync_completes,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_submit_eagain_when_full,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_bad_fd_reports_ebadf,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_zero_length_completes,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_invalid_requests_rejected,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_callback_may_resubmit,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_poll_fd_signals_completion,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_direct_io_unaligned_eof,
                                    fixture_setup, fixture_teardown),
    cmocka_unit_test_setup_teardown(test_aio_free_with_requests_in_flight,
                                    fixture_setup, fixture_teardown),
};

static const struct CMUnitTest auto_tests[] = {
    cmocka_unit_test(test_aio_env_overrides_auto),
};

struct backend_desc {
    const char *env;     /* VIMG_AIO value */
    const char *name;    /* vimg_aio_backend_name */
    enum vimg_aio_backend backend;
};

static const struct backend_desc backends[] = {
    { "uring", "io_uring", VIMG_AIO_URING },
    { "libaio", "libaio", VIMG_AIO_LIBAIO },
    { "threads", "threads", VIMG_AIO_THREADS },
};

/* A host that refuses the backend (seccomp, io_uring_disabled, no AIO,
 * RLIMIT_MEMLOCK, aio-max-nr used up) is not a test failure. */
static bool host_refuses(int err)
{
    return err == -ENOSYS || err == -EPERM || err == -EINVAL ||
           err == -ENOMEM || err == -EAGAIN;
}

int main(void)
{
    const char *forced = getenv("VIMG_AIO");
    unsigned i, ran = 0;
    int failed = 0;

    if (forced && (!*forced || strcmp(forced, "auto") == 0)) {
        forced = NULL;
    }
    for (i = 0; i < sizeof(backends) / sizeof(backends[0]); i++) {
        const struct backend_desc *b = &backends[i];
        struct vimg_aio *aio = NULL;
        char group[64];
        int ret;

        if (forced && strcmp(forced, b->env) != 0) {
            continue;
        }
        cur_create_as = forced ? VIMG_AIO_AUTO : b->backend;
        cur_name = b->name;

        ret = vimg_aio_new(&aio, cur_create_as, TEST_DEPTH);
        if (ret < 0 && host_refuses(ret)) {
            print_message("[  SKIPPED ] aio/%s: cannot be created here: %s\n",
                          b->env, strerror(-ret));
            continue;
        }
        /* Any other failure shows up in every test's setup. */
        vimg_aio_free(aio);

        snprintf(group, sizeof(group), "aio/%s", b->env);
        failed += cmocka_run_group_tests_name(group, backend_tests, NULL, NULL);
        ran++;
    }
    if (forced && ran == 0) {
        bool known = false;

        for (i = 0; i < sizeof(backends) / sizeof(backends[0]); i++) {
            known = known || strcmp(forced, backends[i].env) == 0;
        }
        if (!known) {
            print_message("VIMG_AIO=%s names no backend\n", forced);
            return 1;
        }
    }
    if (ran == 0) {
        return 77;
    }
    failed += cmocka_run_group_tests_name("aio/auto", auto_tests, NULL, NULL);
    return failed ? 1 : 0;
}
