#!/usr/bin/env bash
# Builds the .deb: release binaries, generated man pages and completions (into
# target/release/deb-assets, never into git), `cargo deb`, then checks the package's contents
# and maintainer scripts, failing when something expected is missing.
# Needs cargo-deb (`cargo install cargo-deb --locked`) and dpkg-deb.
# Usage: deploy/deb/build.sh        (prints the path of the .deb last)
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v cargo-deb >/dev/null || { echo "build.sh: cargo-deb missing: cargo install cargo-deb --locked" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "build.sh: dpkg-deb missing" >&2; exit 1; }

target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
release="$target/release"

echo "== release build"
cargo build --release --locked -p subidd -p subidctl -p subid-runc

echo "== man pages and completions"
assets="$release/deb-assets"
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$release/subidd" --generate-man "$assets/man"
"$release/subidctl" generate man "$assets/man"
"$release/subidctl" generate completions bash >"$assets/completions/subidctl.bash"
"$release/subidctl" generate completions zsh >"$assets/completions/_subidctl"
"$release/subidctl" generate completions fish >"$assets/completions/subidctl.fish"
# Debian ships man pages compressed; -n keeps the archive reproducible (no name or time).
gzip -9nf "$assets"/man/*

echo "== cargo deb"
out=$(cargo deb -p subidd --no-build --locked 2>&1) || { echo "$out" >&2; exit 1; }
echo "$out"
deb=$(grep "\.deb$" <<<"$out" | tail -n 1)
[ -f "$deb" ] || { echo "build.sh: cargo deb did not name a .deb: $deb" >&2; exit 1; }

echo "== inspect $deb"
dpkg-deb -I "$deb"
contents=$(dpkg-deb -c "$deb")
echo "$contents"
missing=0
expect() {
    # dpkg-deb -c prints ./path; systemd units may be under /lib or /usr/lib.
    if ! grep -Eq " \./($1)\$" <<<"$contents"; then
        echo "MISSING in package: $1" >&2
        missing=1
    fi
}
expect 'usr/bin/subidd'
expect 'usr/bin/subidctl'
expect 'usr/bin/subid-runc'
expect '(usr/)?lib/systemd/system/subidd\.service'
expect '(usr/)?lib/systemd/system/subidd\.socket'
expect 'usr/lib/sysusers\.d/subidd\.conf'
expect 'usr/lib/tmpfiles\.d/subidd\.conf'
expect 'etc/subidd/subidd\.toml'
expect 'usr/share/man/man8/subidd\.8\.gz'
expect 'usr/share/man/man1/subidctl\.1\.gz'
expect 'usr/share/man/man1/subidctl-lease\.1\.gz'
expect 'usr/share/bash-completion/completions/subidctl'
expect 'usr/share/zsh/vendor-completions/_subidctl'
expect 'usr/share/fish/vendor_completions\.d/subidctl\.fish'
expect 'usr/share/doc/subidd/copyright'

ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
dpkg-deb -e "$deb" "$ctl"
check_ctl() {
    if ! grep -q -- "$2" "$ctl/$1" 2>/dev/null; then
        echo "MISSING in $1: $2" >&2
        missing=1
    fi
}
check_ctl conffiles '/etc/subidd/subidd.toml'
check_ctl postinst 'systemd-sysusers'
check_ctl postinst 'systemd-tmpfiles'
check_ctl postinst 'subidd.socket'
check_ctl postinst 'subidd.service'
check_ctl prerm 'subidd'
# The group must exist before the socket (SocketGroup=subidd) is started.
if [ -f "$ctl/postinst" ]; then
    users=$(grep -n 'systemd-sysusers' "$ctl/postinst" | head -1 | cut -d: -f1)
    start=$(grep -n 'deb-systemd-invoke' "$ctl/postinst" | head -1 | cut -d: -f1)
    if [ -z "$users" ] || [ -z "$start" ] || [ "$users" -gt "$start" ]; then
        echo "postinst starts the units before systemd-sysusers creates the group" >&2
        missing=1
    fi
fi
# The packaged binaries are the ones just built, and they run.
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/subidd >"$ctl/subidd"
chmod +x "$ctl/subidd"
"$ctl/subidd" --version
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/subid-runc >"$ctl/subid-runc"
chmod +x "$ctl/subid-runc"
"$ctl/subid-runc" --subid-help >/dev/null

if ((missing)); then
    echo "build.sh: the package is incomplete" >&2
    exit 1
fi
echo "package ok: $deb"
