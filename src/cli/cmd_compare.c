#include "config.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "io/file.h"

#define IO_BUF_SIZE (2 * 1024 * 1024)
#define SECTOR 512

/* Offset (bytes from buf) of the first 512-byte block where a and b
 * differ, or len when none does. */
static uint64_t first_diff_block(const uint8_t *a, const uint8_t *b, uint64_t len)
{
    for (uint64_t off = 0; off < len; off += SECTOR) {
        uint64_t n = len - off < SECTOR ? len - off : SECTOR;
        if (memcmp(a + off, b + off, n)) {
            return off;
        }
    }
    return len;
}

static uint64_t first_nonzero_block(const uint8_t *a, uint64_t len)
{
    for (uint64_t off = 0; off < len; off += SECTOR) {
        uint64_t n = len - off < SECTOR ? len - off : SECTOR;
        if (!vimg_is_zero(a + off, n)) {
            return off;
        }
    }
    return len;
}

/* 0 when the range reads as zeros; 1 with the mismatch message; 4 on error. */
static int check_empty(struct vimg_image *img, uint64_t offset, uint64_t len,
                       const char *filename, uint8_t *buf, bool quiet)
{
    struct vimg_error err = { 0 };
    if (vimg_pread(img, buf, len, offset, &err) < 0) {
        cli_report("Error while reading offset %" PRIu64 " of %s: %s", offset, filename,
                   strerror(err.code));
        return 4;
    }
    uint64_t d = first_nonzero_block(buf, len);
    if (d < len) {
        if (!quiet) {
            printf("Content mismatch at offset %" PRIu64 "!\n", offset + d);
        }
        return 1;
    }
    return 0;
}

static unsigned status_bits(const struct vimg_status *st)
{
    return st->flags & (VIMG_STATUS_DATA | VIMG_STATUS_ZERO | VIMG_STATUS_ALLOCATED);
}

int cmd_compare(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "object", required_argument, NULL, 'j' + 256 },
        { "image-opts", no_argument, NULL, 'i' + 256 },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt1 = NULL, *fmt2 = NULL;
    bool progress = false, quiet = false, strict = false;
    unsigned flags = 0;
    int c, ret;

    while ((c = getopt_long(argc, argv, ":hf:F:T:pqsU", long_options, NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'f':
            fmt1 = optarg;
            break;
        case 'F':
            fmt2 = optarg;
            break;
        case 'T':
            if (!cli_cache_mode_valid(optarg)) {
                cli_report("Invalid source cache option: %s", optarg);
                return 2;
            }
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 's':
            strict = true;
            break;
        case 'U':
            flags |= VIMG_OPEN_FORCE_SHARE;
            break;
        }
    }
    if (quiet) {
        progress = false;
    }
    if (optind != argc - 2) {
        cli_error_exit("Expecting two image file names");
    }
    const char *filename1 = argv[optind], *filename2 = argv[optind + 1];
    struct cli_progress prog;
    cli_progress_init(&prog, progress, 2.0f);

    struct vimg_image *img1 = cli_open(filename1, fmt1, flags, quiet), *img2 = NULL;
    uint8_t *buf1 = NULL, *buf2 = NULL;
    if (!img1) {
        ret = 2;
        goto out;
    }
    img2 = cli_open(filename2, fmt2, flags, quiet);
    if (!img2) {
        ret = 2;
        goto out;
    }
    buf1 = malloc(IO_BUF_SIZE);
    buf2 = malloc(IO_BUF_SIZE);
    if (!buf1 || !buf2) {
        cli_report("out of memory");
        ret = 2;
        goto out;
    }
    uint64_t size1 = vimg_size(img1), size2 = vimg_size(img2);
    uint64_t total = size1 < size2 ? size1 : size2;
    uint64_t base = size1 > size2 ? size1 : size2;
    uint64_t offset = 0;

    cli_progress_print(&prog, 0, 100);
    if (strict && size1 != size2) {
        ret = 1;
        if (!quiet) {
            printf("Strict mode: Image size mismatch!\n");
        }
        goto out;
    }
    while (offset < total) {
        struct vimg_error err = { 0 };
        struct vimg_status s1, s2;
        if (vimg_block_status(img1, offset, size1 - offset, &s1, &err) < 0) {
            cli_report("Sector allocation test failed for %s", filename1);
            ret = 3;
            goto out;
        }
        if (vimg_block_status(img2, offset, size2 - offset, &s2, &err) < 0) {
            cli_report("Sector allocation test failed for %s", filename2);
            ret = 3;
            goto out;
        }
        bool alloc1 = s1.flags & VIMG_STATUS_ALLOCATED, alloc2 = s2.flags & VIMG_STATUS_ALLOCATED;
        uint64_t chunk = s1.length < s2.length ? s1.length : s2.length;
        /* qemu's strict status also says whether the run reaches the end */
        bool eof1 = offset + s1.length >= size1, eof2 = offset + s2.length >= size2;
        if (strict && (status_bits(&s1) != status_bits(&s2) || eof1 != eof2)) {
            ret = 1;
            if (!quiet) {
                printf("Strict mode: Offset %" PRIu64 " block status mismatch!\n", offset);
            }
            goto out;
        }
        if ((s1.flags & VIMG_STATUS_ZERO) && (s2.flags & VIMG_STATUS_ZERO)) {
            /* both read as zeros */
        } else if (alloc1 == alloc2) {
            if (alloc1) {
                chunk = chunk < IO_BUF_SIZE ? chunk : IO_BUF_SIZE;
                if (vimg_pread(img1, buf1, chunk, offset, &err) < 0) {
                    cli_report("Error while reading offset %" PRIu64 " of %s: %s", offset,
                               filename1, strerror(err.code));
                    ret = 4;
                    goto out;
                }
                if (vimg_pread(img2, buf2, chunk, offset, &err) < 0) {
                    cli_report("Error while reading offset %" PRIu64 " of %s: %s", offset,
                               filename2, strerror(err.code));
                    ret = 4;
                    goto out;
                }
                uint64_t d = first_diff_block(buf1, buf2, chunk);
                if (d < chunk) {
                    if (!quiet) {
                        printf("Content mismatch at offset %" PRIu64 "!\n", offset + d);
                    }
                    ret = 1;
                    goto out;
                }
            }
        } else {
            chunk = chunk < IO_BUF_SIZE ? chunk : IO_BUF_SIZE;
            ret = alloc1 ? check_empty(img1, offset, chunk, filename1, buf1, quiet)
                         : check_empty(img2, offset, chunk, filename2, buf1, quiet);
            if (ret) {
                goto out;
            }
        }
        offset += chunk;
        cli_progress_print(&prog, ((float)chunk / base) * 100, 100);
    }
    if (size1 != size2) {
        struct vimg_image *over = size1 > size2 ? img1 : img2;
        const char *fover = size1 > size2 ? filename1 : filename2;
        if (!quiet) {
            printf("Warning: Image size mismatch!\n");
        }
        while (offset < base) {
            struct vimg_error err = { 0 };
            struct vimg_status st;
            if (vimg_block_status(over, offset, base - offset, &st, &err) < 0) {
                cli_report("Sector allocation test failed for %s", fover);
                ret = 3;
                goto out;
            }
            uint64_t chunk = st.length;
            if ((st.flags & VIMG_STATUS_ALLOCATED) && !(st.flags & VIMG_STATUS_ZERO)) {
                chunk = chunk < IO_BUF_SIZE ? chunk : IO_BUF_SIZE;
                ret = check_empty(over, offset, chunk, fover, buf1, quiet);
                if (ret) {
                    goto out;
                }
            }
            offset += chunk;
            cli_progress_print(&prog, ((float)chunk / base) * 100, 100);
        }
    }
    if (!quiet) {
        printf("Images are identical.\n");
    }
    ret = 0;
out:
    free(buf1);
    free(buf2);
    vimg_close(img2);
    vimg_close(img1);
    cli_progress_end(&prog);
    return ret;
}
