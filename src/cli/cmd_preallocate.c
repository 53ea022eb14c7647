/* vimg's own: allocate an existing sparse image in place, content unchanged. */
#include "config.h"

#include <inttypes.h>
#include <string.h>

#include "cli/cli.h"

int cmd_preallocate(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "mode", required_argument, NULL, 'm' },
        { NULL, 0, NULL, 0 },
    };
    enum vimg_prealloc mode = VIMG_PREALLOC_FALLOC;
    const char *fmt = NULL;
    bool quiet = false;
    int c;

    while ((c = getopt_long(argc, argv, ":f:hqm:", long_options, NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'f':
            fmt = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'm':
            if (vimg_prealloc_parse(optarg, &mode) < 0 || VIMG_PREALLOC_OFF == mode) {
                cli_report("Invalid preallocation mode '%s' (expecting metadata, falloc "
                           "or full)", optarg);
                return 1;
            }
            break;
        }
    }
    if (optind != argc - 1) {
        cli_error_exit("Expecting one image file name");
    }
    /* with its backing chain: data that shows through is copied up */
    struct vimg_image *img = cli_open(argv[optind], fmt, VIMG_OPEN_RDWR, quiet);
    if (!img) {
        return 1;
    }
    struct vimg_error err = { 0 };
    int ret = vimg_preallocate(img, mode, &err);
    if (ret < 0) {
        cli_report_err(&err);
    } else if (!quiet) {
        printf("Image preallocated.\n");
    }
    vimg_close(img);
    return ret < 0 ? 1 : 0;
}
