/* argv[0] dispatch: `vimg` and `qemu-img` behave the same. */
#include "config.h"

#include <libgen.h>
#include <signal.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/image.h"

const char *cli_progname = "vimg";

struct cli_cmd {
    const char *name;
    int (*fn)(int argc, char **argv);
};

static const struct cli_cmd commands[] = {
    { "check", cmd_check },
    { "compare", cmd_compare },
    { "convert", cmd_convert },
    { "create", cmd_create },
    { "info", cmd_info },
    { "map", cmd_map },
    { "measure", cmd_measure },
    { "preallocate", cmd_preallocate },
    { "resize", cmd_resize },
    { NULL, NULL },
};

static void print_version(void)
{
    /* The first line keeps qemu-img's shape so version-sniffing scripts
     * (libvirt parses "qemu-img version X.Y.Z") keep working. */
    printf("%s version 7.2.0 (vimg %s)\n"
           "Copyright (c) 2026 the vimg developers; "
           "command line compatible with qemu-img 7.2\n",
           cli_progname, vimg_version());
}

_Noreturn void cli_help(void)
{
    print_version();
    printf("usage: %s [standard options] command [command options]\n"
           "Disk image utility (vimg), a drop-in for qemu-img\n"
           "\n"
           "    '-h', '--help'       display this help and exit\n"
           "    '-V', '--version'    output version information and exit\n"
           "    '--features'         list the optional features of this build\n"
           "\n"
           "Command syntax:\n"
           "  check [--output=ofmt] [-f fmt] [-r [leaks | all]] [-q] [-U] filename\n"
           "  compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2\n"
           "  convert [-f fmt] [-O output_fmt] [-o options] [-S sparse_size] [-n] [-p] "
           "[-q] [-m num_coroutines] [-W] [--target-is-zero] filename [filename2 [...]] "
           "output_filename\n"
           "  create [-f fmt] [-o options] [-q] filename [size]\n"
           "  info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename\n"
           "  map [--output=ofmt] [-f fmt] [--start-offset=offset] [--max-length=len] "
           "[-U] filename\n"
           "  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | "
           "[-f fmt] filename]\n"
           "  resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename "
           "[+ | -]size\n"
           "  preallocate [-f fmt] [--mode metadata|falloc|full] [-q] filename\n"
           "\n"
           "Supported formats: raw\n",
           cli_progname);
    exit(0);
}

static void print_features(void)
{
    printf("formats=");
    for (size_t i = 0; vimg_internal_drivers[i]; i++) {
        printf("%s%s", i ? "," : "", vimg_internal_drivers[i]->name);
    }
    printf("\nio_uring=%s\nlibaio=%s\nzstd=%s\n", HAVE_LIBURING ? "yes" : "no",
           HAVE_LIBAIO ? "yes" : "no", HAVE_ZSTD ? "yes" : "no");
}

int main(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { "features", no_argument, NULL, 'F' },
        { "trace", required_argument, NULL, 'T' },
        { NULL, 0, NULL, 0 },
    };
    char *name = strdup(argv[0] ? argv[0] : "vimg");
    int c;

    signal(SIGPIPE, SIG_IGN);
    if (name) {
        cli_progname = basename(name);
    }
    if (argc < 2) {
        cli_error_exit("Not enough arguments");
    }
    opterr = 0;
    while ((c = getopt_long(argc, argv, "+:hVT:", long_options, NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'V':
            print_version();
            return 0;
        case 'F':
            print_features();
            return 0;
        case 'T':
            break;  /* qemu's tracing: accepted and ignored */
        }
    }
    if (optind >= argc) {
        return 0;
    }
    const char *cmdname = argv[optind];
    argc -= optind;
    argv += optind;
    optind = 0;     /* full getopt reset for the command's own options */
    for (const struct cli_cmd *cmd = commands; cmd->name; cmd++) {
        if (0 == strcmp(cmdname, cmd->name)) {
            return cmd->fn(argc, argv);
        }
    }
    cli_error_exit("Command not found: %s", cmdname);
}
