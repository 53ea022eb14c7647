/* -o option helpers shared by create, convert and measure. */
#ifndef VIMG_CLI_OPTIONS_H
#define VIMG_CLI_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>

#include "vimg/driver.h"

/* Join repeated -o arguments with ','; prints qemu's message and returns
 * -1 for a malformed list. */
int cli_accumulate_options(char **options, const char *arg);
/* `-o help`: qemu's listing for fmt, with or without a target file name. */
int cli_print_create_help(const char *filename, const char *fmt);
void cli_print_opts_help(const struct vimg_opt_desc *table);
void cli_print_opts_line(const struct vimg_opts *opts, const struct vimg_opt_desc *table);
/* qemu's bdrv_img_create: checks, the Formatting line, create.  size < 0:
 * not given.  Prints errors; returns the exit code. */
int cli_create_image(const char *filename, const char *fmt, const char *options,
                     int64_t size, const char *base, const char *base_fmt, bool quiet);

#endif
