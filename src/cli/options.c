/* Printing of option tables: the -o help listing and the Formatting line. */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/options.h"
#include "core/opts.h"

static const char *opt_type_name(enum vimg_opt_type t)
{
    switch (t) {
    case VIMG_OPT_STRING: return "str";
    case VIMG_OPT_BOOL: return "bool (on/off)";
    case VIMG_OPT_NUMBER: return "num";
    case VIMG_OPT_SIZE: return "size";
    }
    return "str";
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void cli_print_opts_help(const struct vimg_opt_desc *table)
{
    char *lines[64];
    size_t n = 0;

    for (; table && table->name && n < 64; table++) {
        char buf[512];
        int len = snprintf(buf, sizeof(buf), "  %s=<%s>", table->name,
                           opt_type_name(table->type));
        if (table->help) {
            snprintf(buf + len, sizeof(buf) - len, "%*s - %s",
                     len < 24 ? 24 - len : 0, "", table->help);
        }
        lines[n++] = strdup(buf);
    }
    qsort(lines, n, sizeof(char *), cmp_str);
    for (size_t i = 0; i < n; i++) {
        printf("%s\n", lines[i] ? lines[i] : "");
        free(lines[i]);
    }
}

void cli_print_opts_line(const struct vimg_opts *opts, const struct vimg_opt_desc *table)
{
    const char *sep = "";
    for (; table && table->name; table++) {
        const char *v = vimg_opts_get(opts, table->name);
        uint64_t n;
        if (!v) {
            v = table->def_print;
        }
        if (!v) {
            continue;
        }
        if (VIMG_OPT_STRING == table->type) {
            printf("%s%s=", sep, table->name);
            for (const char *c = v; *c; c++) {
                putchar(*c);
                if (',' == *c) {
                    putchar(',');
                }
            }
        } else if ((VIMG_OPT_SIZE == table->type) && vimg_opts_get(opts, table->name) &&
                   0 == vimg_parse_size(v, 'B', &n)) {
            printf("%s%s=%" PRId64, sep, table->name, (int64_t)n);
        } else if (VIMG_OPT_NUMBER == table->type && vimg_opts_get(opts, table->name)) {
            printf("%s%s=%" PRId64, sep, table->name, (int64_t)strtoull(v, NULL, 0));
        } else {
            printf("%s%s=%s", sep, table->name, v);
        }
        sep = " ";
    }
}
