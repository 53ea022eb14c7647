#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"

static void vreport(const char *fmt, va_list ap)
{
    fprintf(stderr, "%s: ", cli_progname);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void cli_report(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(fmt, ap);
    va_end(ap);
}

_Noreturn void cli_error_exit(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(fmt, ap);
    va_end(ap);
    fprintf(stderr, "Try '%s --help' for more information\n", cli_progname);
    exit(1);
}

void cli_report_err_prefix(const struct vimg_error *err, const char *prefix)
{
    fprintf(stderr, "%s: %s%s\n", cli_progname, prefix ? prefix : "",
            err->code ? err->msg : "unknown error");
}

void cli_report_err(const struct vimg_error *err)
{
    cli_report_err_prefix(err, NULL);
}

int cli_parse_output(const char *arg, enum cli_output *out)
{
    if (0 == strcmp(arg, "json")) {
        *out = CLI_OUT_JSON;
    } else if (0 == strcmp(arg, "human")) {
        *out = CLI_OUT_HUMAN;
    } else {
        cli_report("--output must be used with human or json as argument.");
        return -1;
    }
    return 0;
}

int64_t cli_cvtnum_full(const char *name, const char *value, int64_t min, int64_t max)
{
    uint64_t res;
    int ret = vimg_parse_size(value, 'B', &res);

    if (ret < 0 && -ERANGE != ret) {
        cli_report("Invalid %s specified. You may use k, M, G, T, P or E suffixes for",
                   name);
        cli_report("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
        return -1;
    }
    if (0 == ret && ('0' == value[0] && ('x' == value[1] || 'X' == value[1])) &&
        value[2] && strchr("bBkKmMgGtTpPeE", value[strlen(value) - 1])) {
        fprintf(stderr, "%s: warning: Using a multiplier suffix on hex numbers is "
                "deprecated: %s\n", cli_progname, value);
    }
    if (-ERANGE == ret || res > (uint64_t)max || (int64_t)res < min) {
        cli_report("Invalid %s specified. Must be between %" PRId64 " and %" PRId64 ".",
                   name, min, max);
        return -1;
    }
    return (int64_t)res;
}

int64_t cli_cvtnum(const char *name, const char *value)
{
    return cli_cvtnum_full(name, value, 0, INT64_MAX);
}

struct vimg_image *cli_open(const char *filename, const char *fmt, unsigned flags,
                            bool quiet)
{
    struct vimg_error err = { 0 };
    struct vimg_image *img;
    int probed_raw = 0;

    if ((flags & VIMG_OPEN_FORCE_SHARE) && (flags & VIMG_OPEN_RDWR)) {
        cli_report("force-share=on can only be used with read-only images");
        return NULL;
    }
    if (vimg_open(&img, filename, fmt, flags, &probed_raw, &err) < 0) {
        cli_report_err(&err);
        return NULL;
    }
    for (struct vimg_image *l = img; l; l = vimg_backing(l)) {
        if (vimg_warning(l) && !quiet) {
            fprintf(stderr, "%s: warning: %s\n", cli_progname, vimg_warning(l));
        }
    }
    if (probed_raw) {
        fprintf(stderr,
                "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
                "         Automatically detecting the format is dangerous for raw images, "
                "write operations on block 0 will be restricted.\n"
                "         Specify the 'raw' format explicitly to remove the restrictions.\n",
                filename);
    }
    return img;
}

void cli_progress_init(struct cli_progress *p, bool enabled, float min_step)
{
    memset(p, 0, sizeof(*p));
    p->enabled = enabled;
    p->current = 0;
    p->last_print = 0;
    p->min_step = min_step;
}

static double progress_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void cli_progress_use_tty_bar(struct cli_progress *p)
{
    p->tty = p->enabled && isatty(STDOUT_FILENO);
    p->start = p->last_bar = progress_now();
}

void cli_progress_bytes(struct cli_progress *p, uint64_t done, uint64_t total)
{
    p->done_bytes = done;
    p->total_bytes = total;
}

/* "[#########.........]  45.00%  1.2 GiB of 2.6 GiB  310 MiB/s  ETA 0:05" */
static void progress_bar(struct cli_progress *p, float current)
{
    double now = progress_now();
    double elapsed = now - p->start;
    char bar[31], done[32], total[32], rate[48] = "", eta[32] = "";
    int fill = (int)(current / 100 * 30);

    /* a terminal needs no more than a few updates a second */
    if (current < 100 && now - p->last_bar < 0.1) {
        return;
    }
    p->last_bar = now;
    for (int i = 0; i < 30; i++) {
        bar[i] = i < fill ? '#' : '.';
    }
    bar[30] = 0;
    vimg_format_size(p->done_bytes, done, sizeof(done));
    vimg_format_size(p->total_bytes, total, sizeof(total));
    if (elapsed > 0.2 && p->done_bytes) {
        char r[32];
        vimg_format_size((uint64_t)((double)p->done_bytes / elapsed), r, sizeof(r));
        snprintf(rate, sizeof(rate), "  %s/s", r);
    }
    if (elapsed > 0.2 && current > 0 && current < 100) {
        unsigned long left = (unsigned long)(elapsed * (100 - current) / current + 0.5);
        snprintf(eta, sizeof(eta), "  ETA %lu:%02lu", left / 60, left % 60);
    }
    printf("\r[%s] %6.2f%%  %s of %s%s%s\033[K", bar, current, done, total, rate, eta);
    fflush(stdout);
}

/* qemu's arithmetic, in float, so the printed steps are the same. */
void cli_progress_print(struct cli_progress *p, float delta, int max)
{
    float current = 0 == max ? delta : p->current + delta / 100 * max;
    if (current > 100) {
        current = 100;
    }
    p->current = current;
    if (current > p->last_print + p->min_step || current < p->last_print - p->min_step ||
        100 == current || 0 == current) {
        p->last_print = current;
        if (p->enabled && p->tty) {
            progress_bar(p, current);
        } else if (p->enabled) {
            printf("    (%3.2f/100%%)\r", current);
            fflush(stdout);
        }
    }
}

void cli_progress_end(struct cli_progress *p)
{
    if (p->enabled) {
        printf("\n");
    }
}

bool cli_cache_mode_valid(const char *mode)
{
    static const char *const modes[] = { "none", "off", "directsync", "writeback",
                                         "unsafe", "writethrough" };
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        if (0 == strcmp(mode, modes[i])) {
            return true;
        }
    }
    return false;
}
