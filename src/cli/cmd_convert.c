#include "config.h"

#include <inttypes.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/options.h"
#include "core/copy.h"
#include "core/image.h"
#include "core/opts.h"
#include "io/file.h"
#include "util/util.h"

static void convert_progress(void *opaque, float pct)
{
    cli_progress_print(opaque, pct, 0);
}

static void convert_progress_bytes(void *opaque, uint64_t done, uint64_t total)
{
    cli_progress_bytes(opaque, done, total);
}

/*
 * Nothing lost: a new single-file target is created under a temporary name
 * in the target's folder and renamed over the final name only after its
 * data and metadata are flushed, so an error, SIGINT or SIGTERM leaves a
 * file of the final name as it was.  The signal handler removes the
 * temporary itself (unlink is async-signal-safe) and dies by the signal.
 * Multi-file targets (vmdk with extent files named after the target) cannot
 * be renamed as one: they are created under the final name, only when no
 * file of that name exists, and everything created is removed on failure;
 * a signal then stops the copy through the cancel flag.
 */
static char convert_tmp_path[PATH_MAX];
static volatile sig_atomic_t convert_tmp_armed;
static volatile sig_atomic_t convert_cancel;
static volatile sig_atomic_t convert_soft_signals;

static void convert_on_signal(int sig)
{
    if (convert_tmp_armed) {
        unlink(convert_tmp_path);
        convert_tmp_armed = 0;
    }
    if (convert_soft_signals && !convert_cancel) {
        convert_cancel = 1;
        return;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static void convert_signals(bool install)
{
    struct sigaction sa = { .sa_handler = install ? convert_on_signal : SIG_DFL };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
}

static void convert_block_signals(bool block)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    sigprocmask(block ? SIG_BLOCK : SIG_UNBLOCK, &set, NULL);
}

/* vmdk subformats whose extents are separate files named after the target. */
static bool convert_multi_file(const char *fmt, const struct vimg_opts *opts)
{
    const char *sub = opts ? vimg_opts_get(opts, "subformat") : NULL;
    return fmt && 0 == strcmp(fmt, "vmdk") && sub &&
           (0 == strcmp(sub, "monolithicFlat") || 0 == strcmp(sub, "twoGbMaxExtentSparse") ||
            0 == strcmp(sub, "twoGbMaxExtentFlat") || 0 == strcmp(sub, "vmfs") ||
            0 == strcmp(sub, "vmfsSparse"));
}

struct convert_target {
    const char *name;       /* as given */
    char *final;            /* where the result must end up */
    char *tmp;              /* temporary name, or NULL: written in place */
    char *dir;              /* folder, for multi-file cleanup */
    char **before;          /* folder entries before create (multi-file) */
    size_t nbefore;
    bool multi;
    bool replaces;          /* a file of the final name exists */
    mode_t mode;
};

static char *convert_dirname(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        return strdup(".");
    }
    if (slash == path) {
        return strdup("/");
    }
    return strndup(path, (size_t)(slash - path));
}

static int convert_list_dir(const char *dir, char ***names, size_t *n)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    *names = NULL;
    *n = 0;
    if (!d) {
        return -errno;
    }
    while ((e = readdir(d))) {
        char **p = realloc(*names, (*n + 1) * sizeof(**names));
        if (!p) {
            break;
        }
        *names = p;
        if (!(p[*n] = strdup(e->d_name))) {
            break;
        }
        (*n)++;
    }
    closedir(d);
    return 0;
}

static void convert_free_list(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(names[i]);
    }
    free(names);
}

/* Decide where the target is created.  Returns the name to create. */
static const char *convert_target_prepare(struct convert_target *t, const char *name,
                                          const char *fmt, const struct vimg_opts *opts)
{
    struct stat st;
    mode_t mask = umask(0);
    umask(mask);

    memset(t, 0, sizeof(*t));
    t->name = name;
    t->mode = 0666 & ~mask;
    if (convert_multi_file(fmt, opts)) {
        if (0 == lstat(name, &st)) {
            return name;    /* an existing target is overwritten in place */
        }
        t->multi = true;
        t->dir = convert_dirname(name);
        if (t->dir) {
            convert_list_dir(t->dir, &t->before, &t->nbefore);
        }
        return name;
    }
    if (0 == stat(name, &st)) {
        if (!S_ISREG(st.st_mode) || access(name, W_OK) < 0) {
            /* devices are written in place; a file we may not write gets
             * qemu's error from create instead of being replaced */
            return name;
        }
        t->mode = st.st_mode & 07777;
        t->replaces = true;
        t->final = realpath(name, NULL);
    } else {
        t->final = strdup(name);
    }
    if (!t->final) {
        return name;
    }
    char *dir = convert_dirname(t->final);
    const char *base = strrchr(t->final, '/') ? strrchr(t->final, '/') + 1 : t->final;
    if (!dir || strlen(dir) + strlen(base) + 32 > sizeof(convert_tmp_path)) {
        free(dir);
        free(t->final);
        t->final = NULL;
        return name;
    }
    snprintf(convert_tmp_path, sizeof(convert_tmp_path), "%s/.%s.vimg-XXXXXX", dir, base);
    free(dir);
    convert_block_signals(true);
    int fd = mkstemp(convert_tmp_path);
    if (fd < 0) {
        /* no temporary possible (read-only folder...): qemu's way, in place */
        convert_block_signals(false);
        free(t->final);
        t->final = NULL;
        return name;
    }
    close(fd);
    t->tmp = strdup(convert_tmp_path);
    convert_tmp_armed = 1;
    convert_block_signals(false);
    if (!t->tmp) {
        unlink(convert_tmp_path);
        convert_tmp_armed = 0;
        free(t->final);
        t->final = NULL;
        return name;
    }
    return t->tmp;
}

/* Undo what convert created (after a failure or interruption). */
static void convert_target_abort(struct convert_target *t)
{
    if (t->tmp) {
        convert_block_signals(true);
        unlink(t->tmp);
        convert_tmp_armed = 0;
        convert_block_signals(false);
    }
    if (t->multi && t->dir) {
        char **after;
        size_t nafter;
        const char *base = strrchr(t->name, '/') ? strrchr(t->name, '/') + 1 : t->name;
        const char *dot = strrchr(base, '.');
        size_t stem = dot ? (size_t)(dot - base) : strlen(base);
        if (0 == convert_list_dir(t->dir, &after, &nafter)) {
            for (size_t i = 0; i < nafter; i++) {
                bool old = false;
                for (size_t k = 0; k < t->nbefore && !old; k++) {
                    old = 0 == strcmp(after[i], t->before[k]);
                }
                if (!old && 0 == strncmp(after[i], base, stem)) {
                    char path[PATH_MAX];
                    if ((size_t)snprintf(path, sizeof(path), "%s/%s", t->dir, after[i]) <
                        sizeof(path)) {
                        unlink(path);
                    }
                }
            }
            convert_free_list(after, nafter);
        }
    }
}

/* Move the flushed temporary into place. */
static int convert_target_commit(struct convert_target *t, bool durable)
{
    int ret = 0;
    if (!t->tmp) {
        return 0;
    }
    chmod(t->tmp, t->mode);
    convert_block_signals(true);
    if (rename(t->tmp, t->final) < 0) {
        ret = -errno;
        unlink(t->tmp);
    }
    convert_tmp_armed = 0;
    convert_block_signals(false);
    if (0 == ret && durable) {
        /* make the rename itself durable (not with -t unsafe: on ext4 the
         * journal commit would write the new data out as well) */
        char *dir = convert_dirname(t->final);
        int fd = dir ? open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
        if (fd >= 0) {
            fsync(fd);
            close(fd);
        }
        free(dir);
    } else if (ret < 0) {
        cli_report("Could not move the new image into place as '%s': %s", t->final,
                   strerror(-ret));
    }
    return ret;
}

static void convert_target_free(struct convert_target *t)
{
    free(t->final);
    free(t->tmp);
    free(t->dir);
    convert_free_list(t->before, t->nbefore);
}

/* qemu opens the target for writing while the sources are open: an existing
 * file that one of them holds (convert a.img a.img) fails there with the
 * lock message.  The temporary would not see that conflict, so check it. */
static int convert_check_target_lock(const char *name, const char *fmt)
{
    struct vimg_file *f;
    struct vimg_error err = { 0 };
    struct stat st;

    if (stat(name, &st) < 0 || !S_ISREG(st.st_mode) ||
        vimg_file_open_posix(&f, name, VIMG_FILE_RDWR) < 0) {
        return 0;
    }
    int ret = vimg_internal_lock_file(f, VIMG_PERM_WRITE | VIMG_PERM_RESIZE,
                                      VIMG_PERM_RESIZE, &err);
    vimg_file_close(f);
    if (ret < 0) {
        char prefix[4200];
        snprintf(prefix, sizeof(prefix), "%s: error while converting %s: ", name, fmt);
        cli_report_err_prefix(&err, prefix);
    }
    return ret;
}

/* qemu's -l: "snapshot.id=...,snapshot.name=..." or a plain id or name. */
static int convert_check_snapshot_param(const char *arg)
{
    if (0 != strncmp(arg, "snapshot.", 9)) {
        return 0;
    }
    char *copy = strdup(arg);
    char *save = NULL;
    int ret = 0;
    for (char *kv = copy ? strtok_r(copy, ",", &save) : NULL; kv;
         kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (eq) {
            *eq = 0;
        }
        if (0 != strcmp(kv, "snapshot.id") && 0 != strcmp(kv, "snapshot.name")) {
            cli_report("Invalid parameter '%s'", kv);
            ret = -1;
            break;
        }
    }
    free(copy);
    if (ret < 0) {
        cli_report("Failed in parsing snapshot param '%s'", arg);
    }
    return ret;
}

/* -l: "snapshot.id=I,snapshot.name=N" (qemu's options) or one word that is
 * tried as an id, then as a name. */
int cli_load_snapshot(struct vimg_image **srcs, int nsrc, const char *arg)
{
    struct vimg_image *src = srcs[0];
    struct vimg_error err = { 0 };
    bool opts = 0 == strncmp(arg, "snapshot.", 9);
    char *id = NULL, *name = NULL;
    int ret;

    if (!opts && nsrc > 1) {
        cli_report("No support for concatenating multiple snapshot");
        return -1;
    }
    if (!src->drv->snapshot_load_tmp) {
        cli_report("Failed to load snapshot: Block format '%s' used by device '' does not "
                   "support temporarily loading internal snapshots", vimg_format(src));
        return -1;
    }
    if (opts) {
        char *copy = strdup(arg), *save = NULL;
        for (char *kv = copy ? strtok_r(copy, ",", &save) : NULL; kv;
             kv = strtok_r(NULL, ",", &save)) {
            char *eq = strchr(kv, '=');
            const char *val = eq ? eq + 1 : "on";
            if (eq) {
                *eq = 0;
            }
            if (0 == strcmp(kv, "snapshot.id")) {
                free(id);
                id = strdup(val);
            } else {
                free(name);
                name = strdup(val);
            }
        }
        free(copy);
        if (!id && !name) {
            vimg_error_set(&err, EINVAL, "snapshot_id and name are both NULL");
            ret = -EINVAL;
        } else {
            ret = vimg_internal_snapshot_load_tmp(src, id, name, &err);
        }
    } else {
        ret = vimg_internal_snapshot_load_tmp(src, arg, NULL, &err);
        if (-ENOENT == ret || -EINVAL == ret) {
            vimg_error_clear(&err);
            ret = vimg_internal_snapshot_load_tmp(src, NULL, arg, &err);
        }
    }
    free(id);
    free(name);
    if (ret < 0) {
        cli_report_err_prefix(&err, "Failed to load snapshot: ");
        return -1;
    }
    return 0;
}

int cmd_convert(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "object", required_argument, NULL, 'j' + 256 },
        { "image-opts", no_argument, NULL, 'i' + 256 },
        { "target-image-opts", no_argument, NULL, 'I' + 256 },
        { "salvage", no_argument, NULL, 's' + 256 },
        { "target-is-zero", no_argument, NULL, 'z' + 256 },
        { "bitmaps", no_argument, NULL, 'b' + 256 },
        { "skip-broken-bitmaps", no_argument, NULL, 'k' + 256 },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL, *out_fmt = NULL, *out_base = NULL, *backing_fmt = NULL;
    const char *cache = "unsafe", *src_cache = "writeback", *snapshot = NULL;
    char *options = NULL;
    bool compress = false, progress = false, quiet = false, skip_create = false;
    bool target_is_zero = false, copy_range = false, explicit_sparse = false;
    bool bitmaps = false, skip_broken = false, target_image_opts = false;
    bool salvage = false, cache_given = false;
    uint64_t sparse_size = 4096;
    unsigned src_flags = VIMG_OPEN_NO_SHARE;
    long coroutines = 8;
    int c, ret = 1;

    while ((c = getopt_long(argc, argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", long_options,
                            NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'B':
            out_base = optarg;
            break;
        case 'C':
            copy_range = true;
            break;
        case 'c':
            compress = true;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'o':
            if (cli_accumulate_options(&options, optarg) < 0) {
                goto out;
            }
            break;
        case 'l':
            if (convert_check_snapshot_param(optarg) < 0) {
                goto out;
            }
            snapshot = optarg;
            break;
        case 'S': {
            int64_t v = cli_cvtnum("buffer size for sparse output", optarg);
            if (v < 0) {
                goto out;
            }
            if (v > 16 * 1024 * 1024 || v % 512) {
                cli_report("Invalid buffer size for sparse output specified. Valid sizes "
                           "are multiples of 512 up to 16777216. Select 0 to disable "
                           "sparse detection (fully allocates output).");
                goto out;
            }
            sparse_size = (uint64_t)v;
            explicit_sparse = true;
            break;
        }
        case 'p':
            progress = true;
            break;
        case 't':
            cache = optarg;
            cache_given = true;
            break;
        case 'T':
            src_cache = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'n':
            skip_create = true;
            break;
        case 'm': {
            char *end;
            errno = 0;
            coroutines = strtol(optarg, &end, 0);
            if (*end || end == optarg || errno || coroutines < 1 || coroutines > 16) {
                cli_report("Invalid number of coroutines. Allowed number of coroutines is "
                           "between 1 and 16");
                goto out;
            }
            break;
        }
        case 'W':
            /* vimg's writes never depend on order (each range is written
             * once), so out-of-order writes change nothing visible. */
        case 'r':
            break;
        case 'U':
            src_flags |= VIMG_OPEN_FORCE_SHARE;
            break;
        case 'I' + 256:
            target_image_opts = true;
            break;
        case 's' + 256:
            salvage = true;
            break;
        case 'z' + 256:
            target_is_zero = true;
            break;
        case 'b' + 256:
            bitmaps = true;
            break;
        case 'k' + 256:
            skip_broken = true;
            break;
        }
    }
    if (!out_fmt && !target_image_opts) {
        out_fmt = "raw";
    }
    if (skip_broken && !bitmaps) {
        cli_report("Use of --skip-broken-bitmaps requires --bitmaps");
        goto out;
    }
    if (copy_range && compress) {
        cli_report("Cannot enable copy offloading when -c is used");
        goto out;
    }
    if (copy_range && explicit_sparse) {
        cli_report("Cannot enable copy offloading when -S is used");
        goto out;
    }
    if (copy_range && salvage) {
        cli_report("Cannot use copy offloading in salvaging mode");
        goto out;
    }
    if (target_image_opts && !skip_create) {
        cli_report("--target-image-opts requires use of -n flag");
        goto out;
    }
    if (skip_create && options) {
        cli_report("-o has no effect when skipping image creation");
        goto out;
    }
    if (target_is_zero && !skip_create) {
        cli_report("--target-is-zero requires use of -n flag");
        goto out;
    }
    int nsrc = argc - optind - 1;
    const char *out_filename = nsrc >= 1 ? argv[argc - 1] : NULL;
    if (options && vimg_internal_opts_wants_help(options)) {
        if (out_fmt) {
            ret = cli_print_create_help(out_filename, out_fmt);
        } else {
            cli_report("Option help requires a format be specified");
        }
        goto out;
    }
    if (nsrc < 1) {
        cli_report("Must specify image file name");
        goto out;
    }
    if (!cli_cache_mode_valid(src_cache)) {
        cli_report("Invalid source cache option: %s", src_cache);
        goto out;
    }
    /* qemu checks -t only after creating the target (and leaves it behind);
     * vimg checks first and creates nothing */
    if (!cli_cache_mode_valid(cache)) {
        cli_report("Invalid cache option: %s", cache);
        goto out;
    }
    if (quiet) {
        progress = false;
    }
    struct cli_progress prog;
    cli_progress_init(&prog, progress, 1.0f);
    cli_progress_use_tty_bar(&prog);
    cli_progress_print(&prog, 0, 100);

    struct vimg_image **srcs = calloc((size_t)nsrc, sizeof(*srcs));
    struct vimg_image *dst = NULL;
    struct vimg_opts *opts = NULL;
    struct convert_target target = { 0 };
    const char *create_name = out_filename;
    bool created = false;
    uint64_t total = 0;
    if (!srcs) {
        goto out_prog;
    }
    for (int i = 0; i < nsrc; i++) {
        srcs[i] = cli_open(argv[optind + i], fmt, src_flags, quiet);
        if (!srcs[i]) {
            goto out_close;
        }
        total += vimg_size(srcs[i]);
    }
    if (snapshot && cli_load_snapshot(srcs, nsrc, snapshot) < 0) {
        goto out_close;
    }
    total = 0;
    for (int i = 0; i < nsrc; i++) {
        total += vimg_size(srcs[i]);
    }
    if (!skip_create) {
        const struct vimg_driver *drv = vimg_internal_find_driver(out_fmt);
        struct vimg_error err = { 0 };
        if (!drv) {
            cli_report("Unknown file format '%s'", out_fmt);
            goto out_close;
        }
        if (!drv->create) {
            cli_report("Format driver '%s' does not support image creation", out_fmt);
            goto out_close;
        }
        opts = vimg_opts_new();
        if (!opts || (options && vimg_opts_parse(opts, options, &err) < 0) ||
            vimg_internal_opts_validate(opts, vimg_internal_create_opts(drv), &err) < 0) {
            cli_report_err(&err);
            goto out_close;
        }
        if ((out_base || backing_fmt) &&
            !vimg_internal_opt_find(vimg_internal_create_opts(drv), "backing_file")) {
            cli_report("Backing file not supported for file format '%s'", out_fmt);
            goto out_close;
        }
        char sz[32];
        snprintf(sz, sizeof(sz), "%" PRIu64, total);
        vimg_opts_set(opts, "size", sz);
        if (out_base) {
            vimg_opts_set(opts, "backing_file", out_base);
            if (backing_fmt) {
                vimg_opts_set(opts, "backing_fmt", backing_fmt);
            }
        }
        if (vimg_opts_get(opts, "backing_file")) {
            out_base = vimg_opts_get(opts, "backing_file");
        }
    }
    if (target_is_zero && out_base) {
        /* qemu 7.2 prints this and exits 0; vimg reports the failure */
        cli_report("Cannot use --target-is-zero when the destination image has a backing "
                   "file");
        goto out_close;
    }
    if (nsrc > 1 && out_base) {
        cli_report("Having a backing file for the target makes no sense when concatenating "
                   "multiple input images");
        goto out_close;
    }
    if (opts && vimg_opts_get(opts, "backing_file") && !vimg_opts_get(opts, "backing_fmt")) {
        cli_report("Use of backing file requires explicit backing format");
        goto out_close;
    }
    if (compress && !skip_create) {
        const struct vimg_driver *drv = vimg_internal_find_driver(out_fmt);
        const char *prealloc = vimg_opts_get(opts, "preallocation");
        if (!drv->write_compressed) {
            cli_report("Compression not supported for this file format");
            goto out_close;
        }
        if (vimg_opts_get(opts, "encryption") || vimg_opts_get(opts, "encrypt.format")) {
            cli_report("Compression and encryption not supported at the same time");
            goto out_close;
        }
        if (prealloc && 0 != strcmp(prealloc, "off")) {
            cli_report("Compression and preallocation not supported at the same time");
            goto out_close;
        }
    }
    if (bitmaps) {
        if (nsrc > 1) {
            cli_report("Copying bitmaps only possible with single source");
            goto out_close;
        }
        if (srcs[0]->drv->data_only) {
            cli_report("Source lacks bitmap support");
            goto out_close;
        }
    }
    if (!skip_create) {
        struct vimg_error err = { 0 };
        if (convert_check_target_lock(out_filename, out_fmt) < 0) {
            goto out_close;
        }
        convert_soft_signals = convert_multi_file(out_fmt, opts);
        convert_signals(true);
        create_name = convert_target_prepare(&target, out_filename, out_fmt, opts);
        created = true;
        if (vimg_create(create_name, out_fmt, opts, &err) < 0) {
            char prefix[4200];
            snprintf(prefix, sizeof(prefix), "%s: error while converting %s: ", out_filename,
                     out_fmt);
            cli_report_err_prefix(&err, prefix);
            goto out_close;
        }
    }
    /* qemu's default cache mode for convert is "unsafe": it never flushes.
     * vimg flushes when a cache mode that flushes is asked for, and always
     * before its temporary replaces an existing file, so a power loss
     * cannot cost the user the old image.  A new name is renamed into
     * place once its data is complete in the page cache: an error or a
     * signal leaves nothing behind, and only a crash of the whole machine
     * can leave it incomplete, as with qemu-img (docs/architecture.md,
     * "Nothing lost"). */
    bool no_flush = cache_given ? 0 == strcmp(cache, "unsafe")
                                : !(target.tmp && target.replaces);
    dst = cli_open(create_name, out_fmt,
                   VIMG_OPEN_RDWR | VIMG_OPEN_NO_BACKING | (no_flush ? VIMG_OPEN_NO_FLUSH : 0),
                   quiet);
    if (!dst) {
        goto out_close;
    }
    if (skip_create && vimg_size(dst) < total) {
        cli_report("output file is smaller than input file");
        goto out_close;
    }
    if (bitmaps) {
        cli_report("Format driver '%s' does not support bitmaps", vimg_format(dst));
        goto out_close;
    }
    if (compress && !dst->drv->write_compressed) {
        cli_report("Compression not supported for this file format");
        goto out_close;
    }
    bool zero_init = target_is_zero ||
        (!skip_create && sparse_size && !out_base && dst->drv->has_zero_init &&
         dst->drv->has_zero_init(dst));
    struct vimg_copy_opts copts = {
        .sparse_size = copy_range ? 4096 : sparse_size,
        .target_has_zero_init = zero_init,
        .progress = convert_progress,
        .progress_opaque = &prog,
        .progress_bytes = convert_progress_bytes,
        .top_only = out_base != NULL,
        .copy_range = copy_range,
        .fresh_target = !skip_create,
        .compress = compress,
        .src_direct = 0 == strcmp(src_cache, "none") || 0 == strcmp(src_cache, "off") ||
                      0 == strcmp(src_cache, "directsync"),
        .dst_direct = 0 == strcmp(cache, "none") || 0 == strcmp(cache, "off") ||
                      0 == strcmp(cache, "directsync"),
        .no_flush = no_flush,
        /* qemu's -m 8 (its default) maps to the engine's default depth of 4 */
        .queue_depth = (unsigned)VIMG_MAX(2, (coroutines + 1) / 2),
        .cancel = &convert_cancel,
    };
    struct vimg_error err = { 0 };
    if (vimg_copy(srcs, nsrc, dst, &copts, &err) < 0) {
        cli_report_err(&err);
        goto out_close;
    }
    vimg_close(dst);
    dst = NULL;
    if (created && convert_target_commit(&target, !copts.no_flush) < 0) {
        created = false;
        goto out_close;
    }
    created = false;
    cli_progress_print(&prog, 100, 0);
    ret = 0;
out_close:
    vimg_close(dst);
    if (created) {
        convert_target_abort(&target);
    }
    convert_target_free(&target);
    convert_signals(false);
    vimg_opts_free(opts);
    for (int i = 0; srcs && i < nsrc; i++) {
        vimg_close(srcs[i]);
    }
    free(srcs);
out_prog:
    cli_progress_end(&prog);
out:
    free(options);
    return ret;
}
