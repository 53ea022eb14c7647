/*
 * Crash safety of `vimg convert` (src/cli/cmd_convert.c): killed with
 * SIGTERM or SIGINT mid-copy, or failing, it leaves no temporary file, and
 * a file that already had the target's name is untouched.  The vimg binary
 * is found next to this test in the build tree (../../src/vimg).
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <setjmp.h>
#include <cmocka.h>

#define MiB (1024ull * 1024)
#define SRC_SIZE (384 * MiB)

static char tmpdir[PATH_MAX - 64];
static char vimg[PATH_MAX];
static char src[PATH_MAX], out[PATH_MAX];
static const char original[] = "the original target, which must survive\n";

static int group_setup(void **state)
{
    const char *base = getenv("VIMG_TEST_TMP");
    char self[PATH_MAX - 32];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n < 0) {
        return -1;
    }
    self[n] = 0;
    *strrchr(self, '/') = 0;
    snprintf(vimg, sizeof(vimg), "%s/../../src/vimg", self);
    if (access(vimg, X_OK) < 0) {
        return -1;
    }
    if (!base || !*base) {
        base = "/tmp";
    }
    mkdir(base, 0755);
    snprintf(tmpdir, sizeof(tmpdir), "%s/test_copy_crash.XXXXXX", base);
    if (!mkdtemp(tmpdir)) {
        return -1;
    }
    snprintf(src, sizeof(src), "%s/src.img", tmpdir);
    snprintf(out, sizeof(out), "%s/out.img", tmpdir);
    /* dense data, so the copy takes a while */
    int fd = open(src, O_RDWR | O_CREAT | O_TRUNC, 0644);
    uint8_t *buf = malloc(4 * MiB);
    if (fd < 0 || !buf) {
        return -1;
    }
    for (uint64_t off = 0; off < SRC_SIZE; off += 4 * MiB) {
        memset(buf, (int)(1 + off / (4 * MiB)), 4 * MiB);
        if (pwrite(fd, buf, 4 * MiB, (off_t)off) != (ssize_t)(4 * MiB)) {
            return -1;
        }
    }
    free(buf);
    close(fd);
    return 0;
}

static int group_teardown(void **state)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void write_original(void)
{
    FILE *f = fopen(out, "w");
    assert_non_null(f);
    fputs(original, f);
    fclose(f);
}

static void assert_original(void)
{
    char buf[256] = "";
    FILE *f = fopen(out, "r");
    assert_non_null(f);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    assert_string_equal(original, buf);
}

/* Nothing but src.img and (maybe) out.img in the folder. */
static void assert_no_leftovers(void)
{
    DIR *d = opendir(tmpdir);
    struct dirent *e;
    assert_non_null(d);
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") &&
            strcmp(e->d_name, "src.img") && strcmp(e->d_name, "out.img")) {
            fail_msg("left behind: %s", e->d_name);
        }
    }
    closedir(d);
}

/* Start `vimg convert -p src out`, wait until it reports progress, then
 * send sig.  Returns the wait status. */
static int convert_and_kill(int sig, const char *const *extra)
{
    int pipefd[2];
    assert_int_equal(0, pipe(pipefd));
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (0 == pid) {
        const char *argv[16] = { vimg, "convert", "-p", "-f", "raw", "-O", "raw" };
        int n = 7;
        for (int i = 0; extra && extra[i]; i++) {
            argv[n++] = extra[i];
        }
        argv[n++] = src;
        argv[n++] = out;
        argv[n] = NULL;
        dup2(pipefd[1], 1);
        close(pipefd[0]);
        close(pipefd[1]);
        execv(vimg, (char *const *)argv);
        _exit(127);
    }
    close(pipefd[1]);
    /* progress lines end with \r; kill once it is past the start */
    char buf[64];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(pipefd[0], buf + len, 1);
        if (n <= 0) {
            break;
        }
        if ('\r' == buf[len]) {
            buf[len] = 0;
            float pct = 0;
            if (1 == sscanf(buf, " (%f/100%%)", &pct) && pct > 0.5f) {
                break;
            }
            len = 0;
            continue;
        }
        if (++len == sizeof(buf) - 1) {
            len = 0;
        }
    }
    kill(pid, sig);
    close(pipefd[0]);
    int status;
    assert_int_equal(pid, waitpid(pid, &status, 0));
    return status;
}

static void check_killed(int sig, const char *const *extra)
{
    write_original();
    int status = convert_and_kill(sig, extra);
    if (WIFEXITED(status) && 0 == WEXITSTATUS(status)) {
        /* the copy won the race: nothing to check about a kill */
        print_message("convert finished before the signal; inconclusive\n");
        return;
    }
    assert_true(WIFSIGNALED(status));
    assert_int_equal(sig, WTERMSIG(status));
    assert_original();
    assert_no_leftovers();
}

static void test_sigterm_keeps_existing_target(void **state)
{
    check_killed(SIGTERM, NULL);
}

static void test_sigint_keeps_existing_target(void **state)
{
    check_killed(SIGINT, NULL);
}

static void test_sigterm_new_target_leaves_nothing(void **state)
{
    unlink(out);
    int status = convert_and_kill(SIGTERM, NULL);
    if (WIFSIGNALED(status)) {
        struct stat st;
        assert_int_equal(-1, stat(out, &st));
        assert_int_equal(ENOENT, errno);
    }
    assert_no_leftovers();
}

static int run_vimg(const char *const *args)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (0 == pid) {
        const char *argv[16] = { vimg };
        int n = 1;
        for (int i = 0; args[i]; i++) {
            argv[n++] = args[i];
        }
        argv[n] = NULL;
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 2);
        execv(vimg, (char *const *)argv);
        _exit(127);
    }
    int status;
    assert_int_equal(pid, waitpid(pid, &status, 0));
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void test_failure_keeps_existing_target(void **state)
{
    /* the create fails (bad option value), after the temporary exists */
    write_original();
    const char *args[] = { "convert", "-O", "raw", "-o", "preallocation=metadata", src, out,
                           NULL };
    assert_int_equal(1, run_vimg(args));
    assert_original();
    assert_no_leftovers();
}

static void test_success_replaces_target(void **state)
{
    write_original();
    chmod(out, 0600);
    const char *args[] = { "convert", "-t", "unsafe", "-f", "raw", "-O", "raw", src, out,
                           NULL };
    assert_int_equal(0, run_vimg(args));
    struct stat st;
    assert_int_equal(0, stat(out, &st));
    assert_int_equal(SRC_SIZE, st.st_size);
    /* the replaced file keeps its permissions, as qemu-img's in-place write would */
    assert_int_equal(0600, st.st_mode & 0777);
    assert_no_leftovers();
    unlink(out);
}

static bool vimg_has_format(const char *fmt)
{
    char cmd[PATH_MAX + 64], line[256] = "";
    snprintf(cmd, sizeof(cmd), "'%s' --features", vimg);
    FILE *f = popen(cmd, "r");
    bool found = false;
    if (!f) {
        return false;
    }
    while (fgets(line, sizeof(line), f)) {
        if (0 == strncmp(line, "formats=", 8)) {
            char *save = NULL;
            line[strcspn(line, "\n")] = 0;
            for (char *t = strtok_r(line + 8, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                found |= 0 == strcmp(t, fmt);
            }
        }
    }
    pclose(f);
    return found;
}

static void test_multi_file_failure_leaves_nothing(void **state)
{
    /* a vmdk with extent files named after the target: created under the
     * final name, everything removed when convert fails after creating it */
    char qcow2[PATH_MAX], vmdk[PATH_MAX];
    if (!vimg_has_format("vmdk") || !vimg_has_format("qcow2")) {
        skip();
    }
    snprintf(qcow2, sizeof(qcow2), "%s/src.qcow2", tmpdir);
    snprintf(vmdk, sizeof(vmdk), "%s/multi.vmdk", tmpdir);
    const char *mk[] = { "create", "-q", "-f", "qcow2", qcow2, "1M", NULL };
    assert_int_equal(0, run_vimg(mk));
    const char *args[] = { "convert", "--bitmaps", "-O", "vmdk", "-o",
                           "subformat=twoGbMaxExtentFlat", qcow2, vmdk, NULL };
    assert_int_equal(1, run_vimg(args));
    unlink(qcow2);
    unlink(out);
    assert_no_leftovers();
}

static void test_multi_file_sigterm_leaves_nothing(void **state)
{
    if (!vimg_has_format("vmdk")) {
        skip();
    }
    char save[PATH_MAX];
    strcpy(save, out);
    snprintf(out, sizeof(out), "%s/multi.vmdk", tmpdir);
    const char *extra[] = { "-O", "vmdk", "-o", "subformat=monolithicFlat", NULL };
    int status = convert_and_kill(SIGTERM, extra);
    /* the handler stops the copy, convert removes what it created and
     * fails; a second signal would kill it outright */
    if (!(WIFEXITED(status) && 0 == WEXITSTATUS(status))) {
        struct stat st;
        assert_int_equal(-1, stat(out, &st));
    } else {
        print_message("convert finished before the signal; inconclusive\n");
        unlink(out);
    }
    char flat[PATH_MAX];
    snprintf(flat, sizeof(flat), "%s/multi-flat.vmdk", tmpdir);
    unlink(flat);
    strcpy(out, save);
    assert_no_leftovers();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sigterm_keeps_existing_target),
        cmocka_unit_test(test_sigint_keeps_existing_target),
        cmocka_unit_test(test_sigterm_new_target_leaves_nothing),
        cmocka_unit_test(test_failure_keeps_existing_target),
        cmocka_unit_test(test_success_replaces_target),
        cmocka_unit_test(test_multi_file_failure_leaves_nothing),
        cmocka_unit_test(test_multi_file_sigterm_leaves_nothing),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
