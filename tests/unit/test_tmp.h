/*
 * The scratch folder of one unit test program: $VIMG_TEST_TMP/NAME.XXXXXX
 * (under /tmp when the variable is unset), made by test_tmp_make in the
 * group setup and removed with everything in it by test_tmp_remove.
 */
#ifndef VIMG_TEST_TMP_H
#define VIMG_TEST_TMP_H

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

static char tmpdir[PATH_MAX - 128];

static inline int test_tmp_make(const char *name)
{
    const char *base = getenv("VIMG_TEST_TMP");

    if (!base || !*base) {
        base = "/tmp";
    }
    mkdir(base, 0755);
    if (snprintf(tmpdir, sizeof(tmpdir), "%s/%s.XXXXXX", base, name) >= (int)sizeof(tmpdir)) {
        return -1;
    }
    return mkdtemp(tmpdir) ? 0 : -1;
}

static inline int test_tmp_remove(void)
{
    char cmd[sizeof(tmpdir) + 16];

    if (!tmpdir[0]) {
        return 0;
    }
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return 0 == system(cmd) ? 0 : -1;
}

#endif
