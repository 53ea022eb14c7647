#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/options.h"
#include "core/image.h"
#include "core/opts.h"
#include "core/qobj.h"

int cmd_measure(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "image-opts", no_argument, NULL, 'i' + 256 },
        { "object", required_argument, NULL, 'j' + 256 },
        { "output", required_argument, NULL, 'o' + 256 },
        { "size", required_argument, NULL, 's' + 256 },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL, *out_fmt = "raw", *output = NULL, *snapshot = NULL;
    enum cli_output ofmt = CLI_OUT_HUMAN;
    char *options = NULL;
    unsigned flags = 0;
    bool image_opts = false;
    int64_t size = 0;
    bool size_given = false;
    int c, ret = 1;

    while ((c = getopt_long(argc, argv, "hf:O:o:l:U", long_options, NULL)) != -1) {
        switch (c) {
        case '?':
        case 'h':
            cli_help();
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'o':
            if (cli_accumulate_options(&options, optarg) < 0) {
                goto out;
            }
            break;
        case 'l':
            snapshot = optarg;
            break;
        case 'U':
            flags |= VIMG_OPEN_FORCE_SHARE;
            break;
        case 'i' + 256:
            image_opts = true;
            break;
        case 'o' + 256:
            output = optarg;
            break;
        case 's' + 256:
            size = cli_cvtnum("image size", optarg);
            if (size < 0) {
                goto out;
            }
            size_given = true;
            break;
        }
    }
    if (output && cli_parse_output(output, &ofmt) < 0) {
        goto out;
    }
    const char *filename = NULL;
    if (argc - optind > 1) {
        cli_report("At most one filename argument is allowed.");
        goto out;
    } else if (argc - optind == 1) {
        filename = argv[optind];
    }
    if (!filename && (image_opts || fmt || snapshot)) {
        cli_report("--image-opts, -f, and -l require a filename argument.");
        goto out;
    }
    if (filename && size_given) {
        cli_report("--size N cannot be used together with a filename.");
        goto out;
    }
    if (!filename && !size_given) {
        cli_report("Either --size N or one filename must be specified.");
        goto out;
    }

    struct vimg_image *in = NULL;
    if (filename) {
        in = cli_open(filename, fmt, flags, false);
        if (!in) {
            goto out;
        }
        if (snapshot && cli_load_snapshot(&in, 1, snapshot) < 0) {
            vimg_close(in);
            goto out;
        }
    }
    const struct vimg_driver *drv = vimg_internal_find_driver(out_fmt);
    struct vimg_error err = { 0 };
    struct vimg_opts *opts = vimg_opts_new();
    struct vimg_measure m = { 0 };
    if (!drv) {
        cli_report("Unknown file format '%s'", out_fmt);
    } else if (!drv->create) {
        cli_report("Format driver '%s' does not support image creation", out_fmt);
    } else if ((options && vimg_opts_parse(opts, options, &err) < 0) ||
               vimg_internal_opts_validate(opts, vimg_internal_create_opts(drv), &err) < 0) {
        cli_report_err(&err);
        cli_report("Invalid options for file format '%s'", out_fmt);
    } else if (!drv->measure) {
        cli_report("Block driver '%s' does not support size measurement", out_fmt);
    } else {
        if (size_given) {
            char buf[32];
            snprintf(buf, sizeof(buf), "%" PRId64, size);
            vimg_opts_set(opts, "size", buf);
        }
        if (drv->measure(opts, in, &m, &err) < 0) {
            cli_report_err(&err);
        } else {
            if (CLI_OUT_JSON == ofmt) {
                struct vimg_qobj *d = vimg_q_dict();
                if (m.has_bitmaps) {
                    vimg_q_put(d, "bitmaps", vimg_q_int((int64_t)m.bitmaps));
                }
                vimg_q_put(d, "required", vimg_q_int((int64_t)m.required));
                vimg_q_put(d, "fully-allocated", vimg_q_int((int64_t)m.fully_allocated));
                char *s = vimg_q_to_json(d);
                printf("%s\n", s ? s : "");
                free(s);
                vimg_q_free(d);
            } else {
                printf("required size: %" PRIu64 "\n", m.required);
                printf("fully allocated size: %" PRIu64 "\n", m.fully_allocated);
                if (m.has_bitmaps) {
                    printf("bitmaps size: %" PRIu64 "\n", m.bitmaps);
                }
            }
            ret = 0;
        }
    }
    vimg_opts_free(opts);
    vimg_close(in);
out:
    free(options);
    return ret;
}
