#!/usr/bin/env python3
"""Conformance runner: compare vimg against the real qemu-img, byte for byte.

Usage:
    run.py --vimg PATH [--qemu-img /usr/bin/qemu-img] [--qemu-io PATH]
           [-k PATTERN]... [-j N] [-v] [--keep] [CASEFILES...]

Without CASEFILES, every tests/conformance/cases/*.case is run.

For every case two fresh directories are made (under $VIMG_TEST_TMP, or
/tmp): A for the real qemu-img and B for vimg.  The setup steps run
identically in both, always with the REAL qemu-img/qemu-io.  Then each
`run:` line is executed as `qemu-img ARGS...` -- in A with the real
qemu-img, in B with vimg invoked through a symlink named `qemu-img` (so
argv[0] and therefore error-message prefixes match).  The working
directory is the case directory, so relative file names make the outputs
comparable byte for byte.  Exit code, stdout and stderr of every run line
must be identical (after the case's filters), then the `post:` commands
(real tools again) are run in both dirs and compared the same way, then
every file named in `files:` is compared.

Case file format
----------------
Line based.  Blank lines and lines whose first non-blank character is `#`
are ignored.  `[NAME]` starts a case (names are `<command>-<aspect>`, must
be unique).  Inside a case every line is `KEY: VALUE`:

  setup: CMD ARGS...    Setup command, shell-split (no shell).  `qemu-img`
                        and `qemu-io` are the real ones; other programs
                        (truncate, dd, printf, mkdir...) come from $PATH.
                        Must exit 0.
  sh: SHELL TEXT        Setup command run by /bin/sh -c (same PATH as
                        above).  Must exit 0.  setup:/sh: lines run in the
                        order written.
  run: ARGS...          Arguments after `qemu-img`, shell-split.  May be
                        repeated: run in sequence, every output compared.
                        An empty value runs `qemu-img` with no arguments.
  post: CMD ARGS...     After all run lines: command (real tools) run in
                        both dirs; rc/stdout/stderr compared.  Repeatable.
  post-sh: SHELL TEXT   Same, through /bin/sh -c.
  files: F1 F2...       Files (relative to the case dir) whose final state
                        is compared: both exist or both missing; if both
                        regular files: same size, real
                        `qemu-img compare -f raw -F raw` says identical,
                        and same allocation (real `qemu-img map
                        --output=json -f raw`, start/length/data/zero;
                        'offset' ignored).  Repeatable.
  files-content-only: F...
                        Like files:, but the allocation (map) is not
                        compared for these files.
  filter: s/REGEX/REPL/ Python re.sub (MULTILINE) applied to stdout and
                        stderr of run/post commands on both sides before
                        comparing.  Any delimiter character may be used
                        instead of `/` (e.g. s|a/b|x|); it cannot be escaped.
  filter-stdout: s/../../, filter-stderr: s/../../
                        Same, restricted to one stream.
  expect-rc: N          Sanity check on the oracle: EVERY run line must
                        exit with N under the real qemu-img (otherwise the
                        case itself is wrong and fails).
  timeout: SECONDS      Per-command timeout (default 60).
  requires: FMT...      Formats the case needs in vimg (`vimg --features`
                        lists them as formats=a,b); without them the case
                        is reported `skip NAME` and counted as skipped.

Commands get stdin from /dev/null and LC_ALL=C.  Output: one line per case,
`ok NAME` or `FAIL NAME` followed by an indented report, and finally the
line `N passed, N failed`.  Exit status 1 if any case failed.
"""

import argparse
import concurrent.futures
import difflib
import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile

DEFAULT_TIMEOUT = 60
HERE = os.path.dirname(os.path.abspath(__file__))


class CaseError(Exception):
    pass


class Case:
    def __init__(self, name, path, lineno):
        self.name = name
        self.path = path
        self.lineno = lineno
        self.setup = []          # list of ("argv"|"sh", text)
        self.runs = []           # list of str
        self.post = []           # list of ("argv"|"sh", text)
        self.files = []          # list of (name, content_only)
        self.filters = []        # list of (stream|None, regex, repl)
        self.expect_rc = None
        self.timeout = DEFAULT_TIMEOUT
        self.requires = []       # formats vimg must have


def parse_filter(value, where):
    value = value.strip()
    if len(value) < 4 or value[0] != 's':
        raise CaseError("%s: filter must look like s/REGEX/REPL/" % where)
    delim = value[1]
    parts = value[2:].split(delim)
    if len(parts) != 3 or parts[2] != '':
        raise CaseError("%s: filter must look like s%sREGEX%sREPL%s"
                        % (where, delim, delim, delim))
    try:
        rx = re.compile(parts[0], re.MULTILINE)
    except re.error as e:
        raise CaseError("%s: bad regex: %s" % (where, e))
    return rx, parts[1]


def parse_case_file(path):
    cases = []
    cur = None
    with open(path, encoding='utf-8') as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip('\n')
            s = line.strip()
            where = "%s:%d" % (path, lineno)
            if not s or s.startswith('#'):
                continue
            m = re.match(r'^\[([A-Za-z0-9_.+-]+)\]$', s)
            if m:
                cur = Case(m.group(1), path, lineno)
                cases.append(cur)
                continue
            m = re.match(r'^([a-z-]+):(.*)$', s)
            if not m:
                raise CaseError("%s: cannot parse line: %r" % (where, line))
            if cur is None:
                raise CaseError("%s: directive outside of a case" % where)
            key, value = m.group(1), m.group(2).strip()
            if key == 'setup':
                cur.setup.append(('argv', value))
            elif key == 'sh':
                cur.setup.append(('sh', value))
            elif key == 'run':
                cur.runs.append(value)
            elif key == 'post':
                cur.post.append(('argv', value))
            elif key == 'post-sh':
                cur.post.append(('sh', value))
            elif key in ('files', 'files-content-only'):
                for fn in shlex.split(value):
                    cur.files.append((fn, key == 'files-content-only'))
            elif key in ('filter', 'filter-stdout', 'filter-stderr'):
                rx, repl = parse_filter(value, where)
                stream = None if key == 'filter' else key.split('-')[1]
                cur.filters.append((stream, rx, repl))
            elif key == 'expect-rc':
                cur.expect_rc = int(value)
            elif key == 'timeout':
                cur.timeout = float(value)
            elif key == 'requires':
                cur.requires.extend(value.split())
            else:
                raise CaseError("%s: unknown directive %r" % (where, key))
            # validate shell splitting early
            if key in ('setup', 'run', 'post'):
                try:
                    shlex.split(value)
                except ValueError as e:
                    raise CaseError("%s: %s" % (where, e))
    for c in cases:
        if not c.runs:
            raise CaseError("%s:%d: case %s has no run: line"
                            % (c.path, c.lineno, c.name))
    return cases


class Result:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err


def execute(argv, cwd, env, timeout):
    try:
        p = subprocess.run(argv, cwd=cwd, env=env,
                           stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
        rc = p.returncode
        if rc < 0:
            rc = 'killed by signal %d' % -rc
        return Result(rc, p.stdout, p.stderr)
    except subprocess.TimeoutExpired as e:
        return Result('timeout after %ss' % timeout, e.stdout or b'',
                      e.stderr or b'')
    except OSError as e:
        return Result('cannot execute: %s' % e, b'', b'')


def show(data):
    """Render bytes as text lines with control characters made visible."""
    text = data.decode('utf-8', 'backslashreplace')
    lines = text.split('\n')
    if lines and lines[-1] == '':
        lines.pop()
        trailing_nl = True
    else:
        trailing_nl = False
    out = []
    for ln in lines:
        ln = ''.join(ch if (ch >= ' ' or ch == '\t') else
                     '\\x%02x' % ord(ch) for ch in ln)
        out.append(ln)
    if not trailing_nl and out:
        out[-1] += '  [no newline at end]'
    return out


def diff(label, a, b):
    d = difflib.unified_diff(show(a), show(b), 'qemu-img ' + label,
                             'vimg ' + label, lineterm='', n=3)
    return ['    ' + x for x in d]


class Runner:
    def __init__(self, args):
        self.args = args
        self.qemu_img = os.path.abspath(args.qemu_img)
        self.qemu_io = os.path.abspath(args.qemu_io)
        self.vimg = os.path.abspath(args.vimg)
        self.tmpbase = os.environ.get('VIMG_TEST_TMP') or '/tmp'

    def make_env(self, bindir):
        env = dict(os.environ)
        env['PATH'] = bindir + os.pathsep + env.get('PATH', '/usr/bin:/bin')
        env['LC_ALL'] = 'C'
        env['LANG'] = 'C'
        env['TZ'] = 'UTC'
        for k in list(env):
            if k.startswith('QEMU_'):
                del env[k]
        return env

    def filt(self, case, stream, data):
        if not case.filters:
            return data
        text = data.decode('utf-8', 'surrogateescape')
        for st, rx, repl in case.filters:
            if st is None or st == stream:
                text = rx.sub(repl, text)
        return text.encode('utf-8', 'surrogateescape')

    def run_case(self, case):
        root = tempfile.mkdtemp(prefix='vimg-conf-%s-' % case.name,
                                dir=self.tmpbase)
        report = []
        notes = []
        try:
            self._run_case(case, root, report, notes)
        except Exception as e:  # pragma: no cover - runner bug
            report.append('  runner exception: %r' % e)
        finally:
            if self.args.keep:
                report_keep = '  (kept in %s)' % root
            else:
                shutil.rmtree(root, ignore_errors=True)
                report_keep = None
        ok = not report
        if report_keep and (not ok or self.args.verbose):
            report.append(report_keep)
        if self.args.verbose:
            report = notes + report
        return ok, report

    def _run_case(self, case, root, report, notes):
        binreal = os.path.join(root, 'bin-real')
        binvimg = os.path.join(root, 'bin-vimg')
        for d in (binreal, binvimg):
            os.mkdir(d)
        os.symlink(self.qemu_img, os.path.join(binreal, 'qemu-img'))
        os.symlink(self.qemu_io, os.path.join(binreal, 'qemu-io'))
        os.symlink(self.vimg, os.path.join(binvimg, 'qemu-img'))
        # Same relative layout on both sides.
        dir_a = os.path.join(root, 'qemu', 'w')
        dir_b = os.path.join(root, 'vimg', 'w')
        os.makedirs(dir_a)
        os.makedirs(dir_b)
        env_real = self.make_env(binreal)
        env_vimg = self.make_env(binvimg)
        to = case.timeout

        def tool(kind, text, cwd):
            if kind == 'sh':
                return execute(['/bin/sh', '-c', text], cwd, env_real, to)
            argv = shlex.split(text)
            if argv and argv[0] in ('qemu-img', 'qemu-io'):
                argv[0] = os.path.join(binreal, argv[0])
            return execute(argv, cwd, env_real, to)

        # --- setup
        for kind, text in case.setup:
            for side, d in (('A', dir_a), ('B', dir_b)):
                r = tool(kind, text, d)
                if r.rc != 0:
                    report.append('  setup failed (%s dir, rc=%s): %s'
                                  % (side, r.rc, text))
                    report.extend('    ' + x for x in show(r.out + r.err))
                    return

        def compare(label, ra, rb):
            for side, r in (('qemu-img', ra), ('vimg', rb)):
                if isinstance(r.rc, str) and r.rc.startswith('timeout'):
                    report.append('  %s: %s %s' % (label, side, r.rc))
            if ra.rc != rb.rc:
                report.append('  %s: exit code differs: qemu-img=%s vimg=%s'
                              % (label, ra.rc, rb.rc))
            for stream in ('stdout', 'stderr'):
                a = self.filt(case, stream, getattr(ra, stream[3:]))
                b = self.filt(case, stream, getattr(rb, stream[3:]))
                if a != b:
                    report.append('  %s: %s differs:' % (label, stream))
                    report.extend(diff(stream, a, b))

        # --- run lines
        for i, text in enumerate(case.runs):
            args = shlex.split(text)
            label = 'run[%d] qemu-img %s' % (i + 1, text)
            ra = execute([os.path.join(binreal, 'qemu-img')] + args,
                         dir_a, env_real, to)
            rb = execute([os.path.join(binvimg, 'qemu-img')] + args,
                         dir_b, env_vimg, to)
            notes.append('  # %s -> rc=%s/%s' % (label, ra.rc, rb.rc))
            for stream, data in (('stdout', ra.out), ('stderr', ra.err)):
                notes.extend('  #   qemu %s| %s' % (stream, x)
                             for x in show(data))
            compare(label, ra, rb)
            if case.expect_rc is not None and ra.rc != case.expect_rc:
                report.append('  case error: %s: real qemu-img exited %s, '
                              'case expects %d'
                              % (label, ra.rc, case.expect_rc))

        # --- post commands
        for i, (kind, text) in enumerate(case.post):
            ra = tool(kind, text, dir_a)
            rb = tool(kind, text, dir_b)
            compare('post[%d] %s' % (i + 1, text), ra, rb)

        # --- files
        for fn, content_only in case.files:
            self.compare_file(case, fn, os.path.join(dir_a, fn),
                              os.path.join(dir_b, fn), content_only,
                              env_real, report)

    def real(self, args, env, timeout):
        return execute([self.qemu_img] + args, '/', env, timeout)

    def compare_file(self, case, fn, pa, pb, content_only, env, report):
        ea, eb = os.path.lexists(pa), os.path.lexists(pb)
        if ea != eb:
            report.append('  file %s: %s' % (fn, 'missing in vimg dir' if ea
                                             else 'created by vimg only'))
            return
        if not ea:
            return
        sa, sb = os.stat(pa), os.stat(pb)
        if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
            report.append('  file %s: file types differ' % fn)
            return
        if not stat.S_ISREG(sa.st_mode):
            return
        if sa.st_size != sb.st_size:
            report.append('  file %s: size differs: qemu-img=%d vimg=%d'
                          % (fn, sa.st_size, sb.st_size))
        r = self.real(['compare', '-f', 'raw', '-F', 'raw', pa, pb],
                      env, case.timeout)
        if r.rc != 0:
            report.append('  file %s: contents differ (qemu-img compare '
                          'rc=%s)' % (fn, r.rc))
            report.extend('    ' + x for x in
                          show((r.out + r.err).replace(
                              os.path.dirname(pa).encode(), b'A').replace(
                              os.path.dirname(pb).encode(), b'B')))
        if content_only:
            return
        maps = []
        for p in (pa, pb):
            r = self.real(['map', '--output=json', '-f', 'raw', p],
                          env, case.timeout)
            if r.rc != 0:
                report.append('  file %s: qemu-img map failed: %s'
                              % (fn, r.err.decode(errors='replace').strip()))
                return
            try:
                m = json.loads(r.out)
            except ValueError as e:
                report.append('  file %s: bad map json: %s' % (fn, e))
                return
            maps.append([json.dumps({k: e.get(k) for k in
                                     ('start', 'length', 'data', 'zero')},
                                    sort_keys=True) + '\n' for e in m])
        if maps[0] != maps[1]:
            report.append('  file %s: allocation (map) differs:' % fn)
            report.extend('    ' + x.rstrip('\n') for x in
                          difflib.unified_diff(maps[0], maps[1],
                                               'qemu-img map', 'vimg map'))


def select(cases, patterns):
    if not patterns:
        return cases
    out = []
    for c in cases:
        for p in patterns:
            if any(ch in p for ch in '*?['):
                if fnmatch.fnmatchcase(c.name, p):
                    break
            elif p in c.name:
                break
        else:
            continue
        out.append(c)
    return out


def main():
    ap = argparse.ArgumentParser(
        description='Compare vimg against qemu-img (see module docstring).')
    ap.add_argument('--vimg', required=True, help='vimg binary')
    ap.add_argument('--qemu-img', default='/usr/bin/qemu-img')
    ap.add_argument('--qemu-io', default=None,
                    help='default: qemu-io next to --qemu-img, else '
                         '/usr/bin/qemu-io')
    ap.add_argument('-k', action='append', default=[], metavar='PATTERN',
                    help='only cases whose name contains PATTERN (or '
                         'matches it as a glob); repeatable')
    ap.add_argument('-j', type=int, default=1, metavar='N',
                    help='run N cases in parallel')
    ap.add_argument('-v', '--verbose', action='store_true')
    ap.add_argument('--keep', action='store_true',
                    help='keep temporary directories')
    ap.add_argument('--list', action='store_true', help='list case names')
    ap.add_argument('casefiles', nargs='*')
    args = ap.parse_args()

    if args.qemu_io is None:
        cand = os.path.join(os.path.dirname(args.qemu_img), 'qemu-io')
        args.qemu_io = cand if os.path.exists(cand) else '/usr/bin/qemu-io'
    for what, p in (('--vimg', args.vimg), ('--qemu-img', args.qemu_img)):
        if not os.access(p, os.X_OK):
            print('run.py: %s %s is not executable' % (what, p),
                  file=sys.stderr)
            return 2

    files = args.casefiles or sorted(
        glob.glob(os.path.join(HERE, 'cases', '*.case')))
    cases = []
    try:
        for f in files:
            cases.extend(parse_case_file(f))
    except (CaseError, OSError, ValueError) as e:
        print('run.py: %s' % e, file=sys.stderr)
        return 2
    seen = {}
    for c in cases:
        if c.name in seen:
            print('run.py: duplicate case name %s (%s:%d and %s:%d)'
                  % (c.name, seen[c.name].path, seen[c.name].lineno,
                     c.path, c.lineno), file=sys.stderr)
            return 2
        seen[c.name] = c
    cases = select(cases, args.k)
    if args.list:
        for c in cases:
            print(c.name)
        return 0

    formats = set()
    try:
        feat = subprocess.run([args.vimg, '--features'], capture_output=True,
                              text=True, timeout=30).stdout
        for line in feat.splitlines():
            if line.startswith('formats='):
                formats = set(line[len('formats='):].split(','))
    except (OSError, subprocess.SubprocessError):
        pass
    skipped = [c for c in cases if not set(c.requires) <= formats]
    for c in skipped:
        print('skip %s (needs %s)' % (c.name, ' '.join(sorted(set(c.requires) - formats))))
    cases = [c for c in cases if set(c.requires) <= formats]

    runner = Runner(args)
    passed = failed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, args.j)) as ex:
        for case, (ok, report) in zip(cases, ex.map(runner.run_case, cases)):
            print('%s %s' % ('ok' if ok else 'FAIL', case.name))
            for line in report:
                print(line)
            sys.stdout.flush()
            if ok:
                passed += 1
            else:
                failed += 1
    print('%d passed, %d failed, %d skipped' % (passed, failed, len(skipped)))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
