/* Shared by the command files: only src/cli prints, and it picks exit codes. */
#ifndef VIMG_CLI_H
#define VIMG_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "vimg/vimg.h"

/* "qemu-img" or "vimg": the name messages start with. */
extern const char *cli_progname;

void cli_report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* A usage error: message, the help hint, exit 1. */
_Noreturn void cli_error_exit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
_Noreturn void cli_help(void);
/* Print err as "<prog>: <msg>" (multi-line messages keep qemu's layout). */
void cli_report_err(const struct vimg_error *err);
void cli_report_err_prefix(const struct vimg_error *err, const char *prefix);

/* The ':' and '?' cases of every getopt loop. */
#define CLI_GETOPT_COMMON(argv)                                              \
    case ':':                                                                \
        cli_error_exit("missing argument for option '%s'", argv[optind - 1]); \
    case '?':                                                                \
        cli_error_exit("unrecognized option '%s'", argv[optind - 1]);

/* qemu's cache modes: none/off, directsync, writeback, unsafe, writethrough. */
bool cli_cache_mode_valid(const char *mode);

enum cli_output { CLI_OUT_HUMAN, CLI_OUT_JSON };
/* Returns -1 (after printing qemu's message) for anything but human/json. */
int cli_parse_output(const char *arg, enum cli_output *out);

/* qemu-img's cvtnum: parses a size, printing qemu's messages on failure.
 * Returns -1 on error. */
int64_t cli_cvtnum(const char *name, const char *value);
int64_t cli_cvtnum_full(const char *name, const char *value, int64_t min, int64_t max);

/* Open an image as qemu-img's img_open does; prints errors and the probed
 * raw warning.  Returns NULL on failure. */
struct vimg_image *cli_open(const char *filename, const char *fmt, unsigned flags,
                            bool quiet);

/* Progress as qemu-img -p prints it (min_step in percent). */
struct cli_progress {
    bool enabled;
    float current, last_print, min_step;
    /* A terminal gets a one-line bar with rate and ETA instead of qemu's
     * text (which scripts reading a pipe or a file still see). */
    bool tty;
    double start, last_bar;
    uint64_t done_bytes, total_bytes;
};
void cli_progress_init(struct cli_progress *p, bool enabled, float min_step);
/* Use the bar when stdout is a terminal (commands opt in). */
void cli_progress_use_tty_bar(struct cli_progress *p);
/* Bytes behind the percentage, for the bar's rate. */
void cli_progress_bytes(struct cli_progress *p, uint64_t done, uint64_t total);
void cli_progress_print(struct cli_progress *p, float delta, int max);
void cli_progress_end(struct cli_progress *p);

/* -l SNAPSHOT of convert and measure: load an internal snapshot of srcs[0]
 * read-only ("snapshot.id=I,snapshot.name=N" or an id-or-name).  Prints
 * qemu's messages; returns -1 on failure. */
int cli_load_snapshot(struct vimg_image **srcs, int nsrc, const char *arg);

int cmd_info(int argc, char **argv);
int cmd_create(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_measure(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_resize(int argc, char **argv);
int cmd_preallocate(int argc, char **argv);

#endif
