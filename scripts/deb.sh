#!/usr/bin/env bash
# Build the Debian package with cargo-deb (metadata: [package.metadata.deb] in Cargo.toml).
# Installs cargo-deb first if it is missing (`cargo install cargo-deb --locked`).
# Prints the path of the .deb as the last line of stdout.
#   scripts/deb.sh               # release build + package
#   DEB_NO_BUILD=1 scripts/deb.sh  # package the existing target/release binaries
#   DEB_KEEP_DEBUG=1 scripts/deb.sh  # keep the line tables (backtraces) in the binaries
#   DEB_NO_BUILD=1 DEB_PROFILE=dev scripts/deb.sh  # package the existing target/debug binaries
# Binaries are stripped by default: ~185 MB of line tables otherwise. Panic messages keep
# their file:line either way.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "deb: installing cargo-deb (one time)" >&2
    cargo install cargo-deb --locked >&2
fi
# dpkg-shlibdeps is not needed (dependencies are listed by hand), but cargo-deb strips
# the binaries with binutils' strip/objcopy.
for tool in dpkg-deb strip objcopy; do
    command -v "$tool" >/dev/null 2>&1 || { echo "deb: $tool is missing (apt-get install dpkg binutils)" >&2; exit 2; }
done

args=()
if [ -z "${DEB_KEEP_DEBUG:-}" ]; then
    args+=(--strip)
fi
if [ -n "${DEB_NO_BUILD:-}" ]; then
    args+=(--no-build)
fi
# DEB_PROFILE=dev packages the debug build (CI uses it to test the package without a
# second, release build).
if [ -n "${DEB_PROFILE:-}" ]; then
    args+=(--profile "$DEB_PROFILE")
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo deb "${args[@]}" 2>&1 | tee "$log" >&2
out=$(grep -E '\.deb$' "$log" | tail -n1 || true)
if [ -z "$out" ] || [ ! -f "$out" ]; then
    echo "deb: cargo deb did not report a .deb" >&2
    exit 1
fi
echo "$out"
