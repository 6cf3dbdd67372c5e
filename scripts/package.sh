#!/usr/bin/env bash
# Build the Debian package with cargo-deb: target/debian/epidemic_<version>-1_<arch>.deb
# holding /usr/bin/epidemic, the backends and shipped plugins in /usr/lib/epidemic, the
# systemd unit, an example /etc/epidemic/epidemic.toml (a conffile), man pages and
# bash/zsh/fish completions; binaries stripped.
#
#   scripts/package.sh                    # release build, then the package
#   scripts/package.sh --profile dev --no-build
#                                         # package what `cargo build --workspace` built
#                                         # (what the test suite does: no second build)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --no-build) build=no; shift ;;
        *) echo "usage: $0 [--profile release|dev|NAME] [--no-build]" >&2; exit 64 ;;
    esac
done
case "$profile" in
    dev) out_dir=debug ;;
    *) out_dir=$profile ;;
esac
out="${CARGO_TARGET_DIR:-target}/$out_dir"

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "==> installing cargo-deb (cargo install cargo-deb)"
    cargo install cargo-deb --version '~3.8' --locked --quiet
fi
if [ "$build" = yes ]; then
    echo "==> building (cargo build --profile $profile)"
    cargo build --profile "$profile" -p epidemic -p epidemic-backend-sqlite \
        -p epidemic-backend-postgres -p epidemic-backend-mysql -p epidemic-maildir -p epidemic-exec \
        -p epidemic-webhook -p epidemic-nats
fi
# Man pages and completions come from the binary's own command-line definition.
rm -rf "$out/package-assets"
"$out/epidemic" generate-assets "$out/package-assets"
gzip -9n "$out"/package-assets/man/*.1

echo "==> packaging (cargo deb)"
# A dev-profile package is only a test of the packaging: compress it fast.
fast=()
[ "$profile" = dev ] && fast=(--fast)
cargo deb -p epidemic --no-build --profile "$profile" --strip --no-dbgsym "${fast[@]}"
