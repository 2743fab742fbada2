#!/usr/bin/env bash
# Builds the splice-proxy image FROM scratch: prepares a context directory with the release
# binary and exactly the shared libraries it links (as `ldd` reports them), then runs
# `podman build` on deploy/Containerfile.
#
#   deploy/build-image.sh [--binary PATH] [--tag NAME:TAG] [--context DIR] [--no-build] [--no-strip]
#
#   --binary PATH   the splice-proxy to package (default: target/release/splice-proxy;
#                   `cargo xtask build` makes it)
#   --tag NAME:TAG  image name (default: localhost/splice-proxy:latest)
#   --context DIR   prepare the context here and keep it (default: a temporary directory,
#                   removed afterwards)
#   --no-build      only prepare the context (implies keeping it; needs --context)
#   --no-strip      keep the binary's symbols and debug info (stripped by default: 37 -> 4 MB)
#
# Environment: ENGINE (default podman) is the build tool.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
binary=$root/target/release/splice-proxy
tag=localhost/splice-proxy:latest
context=
build=1
strip=1
engine=${ENGINE:-podman}

die() { echo "build-image: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --tag) tag=${2:?--tag needs a name}; shift 2 ;;
        --context) context=${2:?--context needs a directory}; shift 2 ;;
        --no-build) build=0; shift ;;
        --no-strip) strip=0; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[ -x "$binary" ] || die "$binary is not an executable (run 'cargo xtask build' first, or pass --binary)"
if [ "$build" = 0 ] && [ -z "$context" ]; then
    die "--no-build needs --context DIR (the prepared context would be removed otherwise)"
fi

if [ -z "$context" ]; then
    context=$(mktemp -d "${TMPDIR:-/tmp}/splice-proxy-image.XXXXXX")
    trap 'rm -rf "$context"' EXIT
else
    rm -rf "$context"
    mkdir -p "$context"
fi
rootfs=$context/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"

install -m 0755 "$binary" "$rootfs/usr/local/bin/splice-proxy"
# The eBPF object is embedded as data, so stripping symbols and debug info leaves it intact.
if [ "$strip" = 1 ]; then
    command -v strip >/dev/null || die "strip (binutils) is not installed; pass --no-strip"
    strip "$rootfs/usr/local/bin/splice-proxy"
fi

# Every library the dynamic loader resolves, and the loader itself, at the path the binary asks
# for (the loader's path is baked into the ELF interpreter field). Symlinks are followed so the
# image holds real files.
libs=$(ldd "$binary" | awk '
    $2 == "=>" && $3 ~ /^\// { print $3; next }   # libc.so.6 => /lib/.../libc.so.6 (0x...)
    $1 ~ /^\// { print $1 }                          # /lib64/ld-linux-x86-64.so.2 (0x...)
')
[ -n "$libs" ] || die "ldd found no libraries for $binary (a static binary needs none: fine, but check)"
for lib in $libs; do
    [ -e "$lib" ] || die "ldd names $lib but it does not exist"
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
if ldd "$binary" | grep -q 'not found'; then
    die "ldd reports missing libraries: $(ldd "$binary" | grep 'not found' | tr '\n' ' ')"
fi

# The unprivileged user the image runs as (distroless' "nonroot" numbers), and a name service
# configuration that needs no loadable NSS modules: files and DNS are built into glibc >= 2.34.
cat > "$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/:/sbin/nologin
nonroot:x:65532:65532:splice-proxy:/:/sbin/nologin
PASSWD
cat > "$rootfs/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
cat > "$rootfs/etc/nsswitch.conf" <<'NSS'
passwd: files
group: files
hosts: files dns
NSS

cp "$here/Containerfile" "$context/Containerfile"

echo "build-image: context $context: $(find "$rootfs" -type f | wc -l) files," \
    "$(du -sh "$rootfs" | cut -f1) ($(echo $libs | wc -w) libraries)"
[ "$build" = 1 ] || exit 0

"$engine" build --file "$context/Containerfile" --tag "$tag" "$context"
echo "build-image: built $tag"
