#!/usr/bin/env bash
# Fetch a stock Debian x86-64 Linux kernel for Tandem's boot tests, without
# committing it to the repository.
#
# Produces, in $TANDEM_LINUX_DIR (default: <repo>/target/linux/):
#   bzImage   the distribution's vmlinuz (Linux boot protocol, 64-bit entry)
#   vmlinux   the ELF kernel extracted from it (PVH boot via XEN_ELFNOTE_PHYS32_ENTRY)
# and prints the two absolute paths, one per line (bzImage first).
#
# Idempotent: when both files exist and vmlinux has its PVH note, nothing is
# downloaded. Needs apt (Debian/Ubuntu host) and, the first time, network
# access to the package archive. Installs xz-utils/zstd/binutils if missing.
#
# Environment:
#   TANDEM_LINUX_DIR      cache directory (default target/linux under the repo)
#   TANDEM_LINUX_PACKAGE  exact package to download (default: newest
#                         linux-image-<ver>-amd64-unsigned, else linux-image-<ver>-amd64)
set -euo pipefail

die() { echo "fetch-linux: $*" >&2; exit 1; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${TANDEM_LINUX_DIR:-$repo_root/target/linux}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
        die "need root to run: $*"; fi
}

has_pvh_note() {
    # Note type 0x12 = XEN_ELFNOTE_PHYS32_ENTRY, owner "Xen".
    readelf -n "$1" 2>/dev/null | grep -E '^\s*Xen\s' | grep -qE 'PHYS32_ENTRY|0x00000012|Unknown note type: \(0x00000012\)'
}

if [ -s "$out/bzImage" ] && [ -s "$out/vmlinux" ] && command -v readelf >/dev/null && has_pvh_note "$out/vmlinux"; then
    echo "$out/bzImage"
    echo "$out/vmlinux"
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found: this script needs a Debian-based host (or put bzImage and vmlinux into $out yourself)"

need_pkgs=()
command -v xz >/dev/null || need_pkgs+=(xz-utils)
command -v zstd >/dev/null || need_pkgs+=(zstd)
command -v readelf >/dev/null || need_pkgs+=(binutils)

apt_updated=0
apt_update() {
    if [ "$apt_updated" -eq 0 ]; then
        as_root apt-get update -qq >&2 || die "apt-get update failed (is the package archive reachable?)"
        apt_updated=1
    fi
}

if [ "${#need_pkgs[@]}" -gt 0 ]; then
    apt_update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >&2 \
        || die "could not install ${need_pkgs[*]}"
fi

find_pkg() {
    apt-cache search --names-only '^linux-image-[0-9][0-9.]*-[0-9]+-amd64(-unsigned)?$' 2>/dev/null \
        | awk '{print $1}' | sort -V
}

pkg="${TANDEM_LINUX_PACKAGE:-}"
if [ -z "$pkg" ]; then
    list="$(find_pkg)"
    [ -n "$list" ] || { apt_update; list="$(find_pkg)"; }
    [ -n "$list" ] || die "no linux-image-<version>-amd64 package known to apt"
    # Newest version; prefer its -unsigned variant (same kernel, no signature).
    newest="$(echo "$list" | sed 's/-unsigned$//' | sort -uV | tail -n1)"
    if echo "$list" | grep -qx "$newest-unsigned"; then pkg="$newest-unsigned"; else pkg="$newest"; fi
fi

work="$(mktemp -d "$out/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# As root, apt-get download would drop privileges to _apt, which cannot
# write into our directory: download as root (no sandbox) instead.
dl_opts=()
[ "$(id -u)" -ne 0 ] || dl_opts=(-o APT::Sandbox::User=root)

echo "fetch-linux: downloading $pkg" >&2
( cd "$work" && apt-get download -qq "${dl_opts[@]}" "$pkg" >&2 ) || {
    apt_update
    ( cd "$work" && apt-get download -qq "${dl_opts[@]}" "$pkg" >&2 ) || die "apt-get download $pkg failed (is the package archive reachable?)"
}
deb="$(ls "$work"/*.deb | head -n1)"
dpkg-deb -x "$deb" "$work/root"
vmlinuz="$(ls "$work"/root/boot/vmlinuz-* 2>/dev/null | head -n1)"
[ -n "$vmlinuz" ] || die "$pkg contains no boot/vmlinuz-*"

# Extract the ELF vmlinux from the bzImage, like linux/scripts/extract-vmlinux:
# try each compressed-payload magic found in the file, keep the first that
# decompresses to an ELF.
try_decompress() { # magic-as-printf-escape  grep-pattern  command...
    local magic="$1" pat="$2"; shift 2
    local pos
    for pos in $(LC_ALL=C tr "$magic\n$pat" "\n$pat=" < "$vmlinuz" | grep -abo "^$pat" | cut -d: -f1); do
        tail -c+"$pos" "$vmlinuz" | "$@" > "$work/vmlinux" 2>/dev/null || true
        if [ -s "$work/vmlinux" ] && [ "$(head -c4 "$work/vmlinux" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; then
            return 0
        fi
    done
    return 1
}
try_decompress '\3757zXZ\000' xy    xz -dc      \
 || try_decompress '(\265/\375' xy   zstd -dc    \
 || try_decompress '\037\213\010' xy gunzip -c   \
 || die "could not extract an ELF vmlinux from $vmlinuz (unknown compression)"

has_pvh_note "$work/vmlinux" || die "extracted vmlinux has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY): kernel built without CONFIG_PVH?"

cp "$vmlinuz" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
mv "$work/vmlinux" "$out/vmlinux"
echo "$pkg" > "$out/PACKAGE"
echo "$out/bzImage"
echo "$out/vmlinux"
