#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/options.h"
#include "core/image.h"
#include "core/opts.h"

int cli_print_create_help(const char *filename, const char *fmt)
{
    const struct vimg_driver *drv = vimg_internal_find_driver(fmt);
    if (!drv) {
        cli_report("Unknown file format '%s'", fmt);
        return 1;
    }
    if (!drv->create_opts) {
        cli_report("Format driver '%s' does not support image creation", fmt);
        return 1;
    }
    if (filename) {
        printf("Supported options:\n");
        cli_print_opts_help(vimg_internal_create_opts(drv));
    } else {
        printf("Supported %s options:\n", fmt);
        cli_print_opts_help(drv->create_opts);
        printf("\nThe protocol level may support further options.\n"
               "Specify the target filename to include those options.\n");
    }
    return 0;
}

/* qemu refuses an empty list, a leading comma, and an odd run of trailing
 * commas (a dangling separator rather than an escaped one). */
static bool option_list_valid(const char *arg)
{
    size_t len = strlen(arg), i = len;
    if (!arg[0] || ',' == arg[0]) {
        return false;
    }
    while (i > 0 && ',' == arg[i - 1]) {
        i--;
    }
    return 0 == (len - i) % 2;
}

int cli_accumulate_options(char **options, const char *arg)
{
    char *n;
    if (!option_list_valid(arg)) {
        cli_report("Invalid option list: %s", arg);
        return -1;
    }
    if (!*options) {
        *options = strdup(arg);
        return *options ? 0 : -1;
    }
    if (asprintf(&n, "%s,%s", *options, arg) < 0) {
        return -1;
    }
    free(*options);
    *options = n;
    return 0;
}

/* -u: do not open the backing file (qemu's BDRV_O_NO_BACKING) */
static bool cli_create_unsafe;

int cmd_create(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "object", required_argument, NULL, 'j' + 256 },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = "raw", *base = NULL, *base_fmt = NULL;
    char *options = NULL;
    bool quiet = false;
    int64_t size = -1;
    int c;

    while ((c = getopt_long(argc, argv, ":F:b:f:ho:qu", long_options, NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'F':
            base_fmt = optarg;
            break;
        case 'b':
            base = optarg;
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'o':
            if (cli_accumulate_options(&options, optarg) < 0) {
                free(options);
                return 1;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'u':
            cli_create_unsafe = true;
            break;
        case 'j' + 256:
            break;
        }
    }
    const char *filename = optind < argc ? argv[optind] : NULL;
    if (options && vimg_internal_opts_wants_help(options)) {
        free(options);
        return cli_print_create_help(filename, fmt);
    }
    if (optind >= argc) {
        cli_error_exit("Expecting image file name");
    }
    optind++;
    if (optind < argc) {
        size = cli_cvtnum("image size", argv[optind++]);
        if (size < 0) {
            free(options);
            return 1;
        }
    }
    if (optind != argc) {
        cli_error_exit("Unexpected argument: %s", argv[optind]);
    }
    int ret = cli_create_image(filename, fmt, options, size, base, base_fmt, quiet);
    free(options);
    return ret;
}

/* qemu's bdrv_img_create: a backing file must open (its size is the
 * default size) and must come with its format. */
static int cli_create_check_backing(const char *filename, struct vimg_opts *opts,
                                    struct vimg_error *err)
{
    const char *backing = vimg_opts_get(opts, "backing_file");
    const char *bfmt = vimg_opts_get(opts, "backing_fmt");
    const char *slash = strrchr(filename, '/');
    struct vimg_image *b;
    char *full = NULL;
    char prefix[4200];
    int ret;

    if (!backing) {
        return 0;
    }
    if (0 == strcmp(filename, backing)) {
        vimg_error_set(err, EINVAL, "Error: Trying to create an image with the same "
                       "filename as the backing file");
        return -EINVAL;
    }
    if (!backing[0]) {
        vimg_error_set(err, EINVAL, "Expected backing file name, got empty string");
        return -EINVAL;
    }
    if (cli_create_unsafe) {
        /* -u: the backing file is not opened, but its format must be named */
        if (!bfmt) {
            vimg_error_set(err, EINVAL, "Backing file specified without backing format");
            return -EINVAL;
        }
        return 0;
    }
    if ('/' != backing[0] && slash &&
        asprintf(&full, "%.*s%s", (int)(slash - filename) + 1, filename, backing) < 0) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    ret = vimg_open(&b, full ? full : backing, bfmt, VIMG_OPEN_NO_IO | VIMG_OPEN_FORCE_SHARE,
                    NULL, err);
    if (ret < 0) {
        /* bdrv_img_create shows the driver's message without the "Could
         * not open" that vimg_open puts in front (a missing file keeps the
         * one its own message starts with) */
        const char *m = err->msg;
        char once[4200];
        size_t n = (size_t)snprintf(once, sizeof(once), "Could not open '%s': ",
                                    full ? full : backing);
        if (0 == strncmp(m, once, n)) {
            m += n;
        }
        snprintf(prefix, sizeof(prefix), "%s\nCould not open backing image.", m);
        free(full);
        vimg_error_clear(err);
        vimg_error_set(err, -ret, "%s", prefix);
        return ret;
    }
    free(full);
    if (!bfmt) {
        snprintf(prefix, sizeof(prefix), "%s: %s: Backing file specified without backing "
                 "format\nDetected format of %s.", cli_progname, filename, vimg_format(b));
        vimg_close(b);
        vimg_error_set(err, ECANCELED, "%s", prefix);
        return -ECANCELED;
    }
    if (!vimg_opts_get(opts, "size")) {
        char buf[32];
        snprintf(buf, sizeof(buf), "%" PRIu64, vimg_size(b));
        vimg_opts_set(opts, "size", buf);
    }
    vimg_close(b);
    return 0;
}

int cli_create_image(const char *filename, const char *fmt, const char *options,
                     int64_t size, const char *base, const char *base_fmt, bool quiet)
{
    const struct vimg_driver *drv = vimg_internal_find_driver(fmt);
    struct vimg_error err = { 0 };
    struct vimg_opts *opts = NULL;
    char prefix[4200];
    int ret = 1;

    snprintf(prefix, sizeof(prefix), "%s: ", filename);
    if (!drv) {
        vimg_error_set(&err, EINVAL, "Unknown file format '%s'", fmt);
        goto fail;
    }
    if (!drv->create) {
        vimg_error_set(&err, ENOTSUP, "Format driver '%s' does not support image creation",
                       fmt);
        goto fail;
    }
    opts = vimg_opts_new();
    if (!opts) {
        vimg_error_set(&err, ENOMEM, "out of memory");
        goto fail;
    }
    if (options && vimg_opts_parse(opts, options, &err) < 0) {
        goto fail;
    }
    const struct vimg_opt_desc *table = vimg_internal_create_opts(drv);
    if (vimg_internal_opts_validate(opts, table, &err) < 0) {
        goto fail;
    }
    if (!vimg_opts_get(opts, "size")) {
        if (size >= 0) {
            char buf[32];
            snprintf(buf, sizeof(buf), "%" PRId64, size);
            vimg_opts_set(opts, "size", buf);
        }
    } else if (size >= 0) {
        vimg_error_set(&err, EINVAL, "The image size must be specified only once");
        goto fail;
    }
    if (base) {
        if (!vimg_internal_opt_find(table, "backing_file")) {
            vimg_error_set(&err, EINVAL, "Backing file not supported for file format '%s'",
                           fmt);
            goto fail;
        }
        vimg_opts_set(opts, "backing_file", base);
    }
    if (base_fmt) {
        if (!vimg_internal_opt_find(table, "backing_fmt")) {
            vimg_error_set(&err, EINVAL,
                           "Backing file format not supported for file format '%s'", fmt);
            goto fail;
        }
        vimg_opts_set(opts, "backing_fmt", base_fmt);
    }
    if (cli_create_check_backing(filename, opts, &err) < 0) {
        if (ECANCELED == err.code) {
            /* qemu prints this hint without a final newline */
            fprintf(stderr, "%s", err.msg);
            vimg_opts_free(opts);
            return 1;
        }
        goto fail;
    }
    if (!vimg_opts_get(opts, "size")) {
        vimg_error_set(&err, EINVAL, "Image creation needs a size parameter");
        goto fail;
    }
    if (!quiet) {
        printf("Formatting '%s', fmt=%s ", filename, fmt);
        cli_print_opts_line(opts, table);
        printf("\n");
        fflush(stdout);
    }
    ret = vimg_create(filename, fmt, opts, &err);
    const struct vimg_opt_desc *c;
    if (-EFBIG == ret) {
        vimg_error_clear(&err);
        vimg_error_set(&err, EFBIG, "The image size is too large for file format '%s'%s", fmt,
                       (vimg_opts_get(opts, "cluster_size") ||
                        ((c = vimg_internal_opt_find(table, "cluster_size")) && c->def_print &&
                         strcmp(c->def_print, "0")))
                           ? " (try using a larger cluster size)" : "");
    }
    if (ret < 0) {
        ret = 1;
        goto fail;
    }
    vimg_opts_free(opts);
    return 0;
fail:
    cli_report_err_prefix(&err, prefix);
    vimg_opts_free(opts);
    return 1;
}
