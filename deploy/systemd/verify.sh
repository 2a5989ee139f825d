#!/usr/bin/env bash
# Checks the units and the sysusers/tmpfiles snippets with systemd's own tools, without
# systemd running as PID 1 (CI): `systemd-analyze verify` needs ExecStart= to exist, so a copy
# of the units is verified with ExecStart= pointed at the built binary.
# Usage: deploy/systemd/verify.sh [path/to/subidd]   (default target/debug/subidd)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-target/debug/subidd}")
[ -x "$bin" ] || { echo "verify.sh: $bin is not built" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in deploy/systemd/subidd.service deploy/systemd/subidd.socket; do
    sed "s|^ExecStart=/usr/bin/subidd|ExecStart=$bin|" "$unit" >"$tmp/$(basename "$unit")"
done
grep -q "^ExecStart=$bin" "$tmp/subidd.service" || { echo "verify.sh: ExecStart= not rewritten" >&2; exit 1; }
# --man=no: the man pages are only installed with the package.
out=$(systemd-analyze verify --man=no "$tmp/subidd.socket" "$tmp/subidd.service" 2>&1) || {
    echo "$out" >&2
    exit 1
}
# verify exits 0 on some warnings; treat anything it says about our units as a failure.
if grep -E "subidd\.(service|socket)" <<<"$out"; then
    exit 1
fi
echo "systemd-analyze verify: subidd.service subidd.socket ok"

# sysusers: a dry run against an empty root reports what it would create.
mkdir -p "$tmp/root/etc"
sysusers=$(systemd-sysusers --root="$tmp/root" --dry-run - <deploy/sysusers.d/subidd.conf 2>&1)
grep -q "subidd" <<<"$sysusers" || { echo "sysusers: $sysusers" >&2; exit 1; }
echo "systemd-sysusers: $(tr '\n' ' ' <<<"$sysusers")"

# tmpfiles: create under a scratch root and check the result.
systemd-tmpfiles --root="$tmp/root" --create - <deploy/tmpfiles.d/subidd.conf
[ "$(stat -c %a "$tmp/root/run/subidd")" = 755 ] || { echo "tmpfiles: /run/subidd not 0755" >&2; exit 1; }
echo "systemd-tmpfiles: /run/subidd 0755 ok"
