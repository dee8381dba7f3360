#!/usr/bin/env bash
# Builds the Debian packages of mqtls on a Debian 12 x86_64 machine (as root, or with sudo for the
# build tools it installs when they are missing):
#
#   target/debian/mqtls_<version>-<revision>_<arch>.deb         the binary (stripped), units, sysusers
#                                                               file, /etc/mqtls, man pages, completions
#   target/debian/mqtls-dbgsym_<version>-<revision>_<arch>.deb  its debug symbols (by build id)
#
# Usage: scripts/package.sh [--arch amd64|arm64|all] [--revision N] [--out DIR]
#   --arch      the architecture to build for; repeatable; `all` is amd64 and arm64 (default: amd64);
#               armhf is wired the same way but untested
#   --revision  the Debian revision (default 1); the version itself is Cargo.toml's
#   --out       where the packages go (default target/debian)
#
# The package is assembled with dpkg-deb from the files listed below; no debhelper, no cargo-deb.
# amd64 is built with the toolchain on PATH. Other architectures are cross-built with Debian's gcc cross
# compiler and Debian's Rust: rustc-web and cargo-web, with libstd-rust-web-dev of the same version for
# the target architecture, downloaded with apt-get into ~/.cache/mqtls and unpacked there (the machine's
# dpkg architectures are not changed). Only Debian's archive is needed, no rustup download.
set -euo pipefail
# A failure inside $(...) stops the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
repo=$PWD

arches=()
revision=1
out=target/debian
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) [ "$2" = all ] && arches+=(amd64 arm64) || arches+=("$2"); shift 2 ;;
    --revision) revision="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#arches[@]} -gt 0 ] || arches=(amd64)

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
debversion="$version-$revision"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/mqtls"
# File times in the packages: the commit's time, so that two builds of one commit give the same files.
# Not exported: build scripts that watch SOURCE_DATE_EPOCH (cc's) would make cargo rebuild for it.
source_date_epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || stat -c %Y Cargo.toml)}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

say() { echo "package.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# Debian architecture -> Rust target, GNU triplet (cross tools' prefix).
triple_of() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    armhf) echo armv7-unknown-linux-gnueabihf ;;
    *) die "unsupported architecture $1 (amd64, arm64, armhf)" ;;
  esac
}
gnu_of() {
  case "$1" in
    amd64) echo x86_64-linux-gnu ;;
    arm64) echo aarch64-linux-gnu ;;
    armhf) echo arm-linux-gnueabihf ;;
  esac
}

need_debs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing with apt-get: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# The Rust standard library for $1 (a Debian architecture) from Debian, matching the installed
# rustc-web exactly; prints the sysroot to pass to rustc. Downloaded once per rustc-web version.
debian_std_sysroot() {
  local arch="$1" rustc_version lists sysroot deb
  rustc_version=$(dpkg-query -W -f='${Version}' rustc-web)
  sysroot="$cache/rust-std/$arch-$rustc_version"
  if [ ! -d "$sysroot/usr/lib/rustlib/$(triple_of "$arch")/lib" ]; then
    lists="$cache/apt-$arch"
    mkdir -p "$lists/lists/partial" "$lists/cache/archives/partial" "$lists/download"
    # A private copy of the package lists that also knows $arch; /var/lib/apt and dpkg stay as they are.
    local apt=(apt-get -qq -o "Dir::State::Lists=$lists/lists" -o "Dir::Cache=$lists/cache"
      -o "APT::Architectures::=$(dpkg --print-architecture)" -o "APT::Architectures::=$arch"
      -o APT::Sandbox::User=root -o Debug::NoLocking=1)
    say "fetching libstd-rust-web-dev:$arch $rustc_version (Debian's Rust standard library for $arch)"
    # A mirror in the middle of a sync serves index files that do not match yet: try again a little later.
    local try
    for try in 1 2 3; do
      "${apt[@]}" update && break
      [ "$try" -lt 3 ] || die "apt-get update failed for $arch"
      sleep 30
    done
    (cd "$lists/download" && rm -f ./*.deb &&
      "${apt[@]}" download "libstd-rust-web-dev:$arch=$rustc_version") ||
      die "libstd-rust-web-dev:$arch=$rustc_version is not in the archive; upgrade rustc-web (apt-get install rustc-web cargo-web) and run again"
    deb=$(ls "$lists/download"/libstd-rust-web-dev_*_"$arch".deb)
    rm -rf "$sysroot.tmp" && mkdir -p "$sysroot.tmp"
    dpkg-deb -x "$deb" "$sysroot.tmp"
    rm -rf "$sysroot" && mv "$sysroot.tmp" "$sysroot"
    rm -f "$deb"
  fi
  echo "$sysroot/usr"
}

# Builds the release binary for $1 and prints its path.
build() {
  local arch="$1" triple gnu
  triple=$(triple_of "$arch")
  gnu=$(gnu_of "$arch")
  if [ "$arch" = "$(dpkg --print-architecture)" ]; then
    say "building mqtls $version for $arch with $(rustc --version)"
    cargo build --release --locked --bin mqtls >&2
    echo "$repo/target/release/mqtls"
    return
  fi
  need_debs "gcc-$gnu" "libc6-dev-$arch-cross" "binutils-$gnu"
  local upper env=()
  upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
  env+=("CARGO_TARGET_${upper}_LINKER=$gnu-gcc" "CC_${triple//-/_}=$gnu-gcc" "AR_${triple//-/_}=$gnu-ar")
  need_debs rustc-web cargo-web
  local sysroot
  sysroot=$(debian_std_sysroot "$arch")
  # Debian's compiler gets a target directory of its own: sharing target/ with another rustc would make
  # each rebuild everything for the other.
  say "building mqtls $version for $arch with Debian's $(/usr/bin/rustc --version) and libstd-rust-web-dev:$arch"
  env "${env[@]}" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_TARGET_DIR="$repo/target/debian-rust" \
    "CARGO_TARGET_${upper}_RUSTFLAGS=--sysroot=$sysroot" \
    /usr/bin/cargo build --release --locked --bin mqtls --target "$triple" >&2
  echo "$repo/target/debian-rust/$triple/release/mqtls"
}

# Depends: for the shared libraries the binary needs, at the newest symbol version it uses.
depends_of() {
  local bin="$1" deps=() lib glibc gcc
  for lib in $(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    case "$lib" in
      libc.so.6|libm.so.6|libdl.so.2|libpthread.so.0|librt.so.1|libutil.so.1|ld-linux*)
        glibc=$(readelf --dyn-syms -W "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)
        deps+=("libc6 (>= $glibc)") ;;
      libgcc_s.so.1)
        gcc=$(readelf --dyn-syms -W "$bin" | grep -o '@GCC_[0-9.]*' | sed 's/@GCC_//' | sort -V | tail -n1)
        deps+=("libgcc-s1 (>= ${gcc%.*})") ;;
      *) die "$bin needs $lib: add the Debian package that provides it to depends_of" ;;
    esac
  done
  printf '%s\n' "${deps[@]}" | sort -u | paste -sd, | sed 's/,/, /g'
}

installed_size() { du -k -s --apparent-size --exclude=DEBIAN "$1" | cut -f1; }

md5sums() { (cd "$1" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) > "$1/DEBIAN/md5sums"; }

# Files under the stage get the commit's time; then dpkg-deb builds $2 from $1.
build_deb() {
  find "$1" -exec touch --no-dereference --date="@$source_date_epoch" {} +
  SOURCE_DATE_EPOCH="$source_date_epoch" dpkg-deb --root-owner-group -Zxz --build "$1" "$2" >/dev/null
}

# Man pages and completions, made by the binary itself (run here on the build machine).
generate_docs() {
  local host_bin="$1" stage="$2" tmp
  tmp=$(mktemp -d)
  "$host_bin" man --out "$tmp/man1" >/dev/null
  install -d "$stage/usr/share/man/man1"
  for page in "$tmp"/man1/*.1; do
    gzip -9n <"$page" >"$stage/usr/share/man/man1/$(basename "$page").gz"
  done
  install -d "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
    "$stage/usr/share/fish/vendor_completions.d"
  "$host_bin" completions bash >"$stage/usr/share/bash-completion/completions/mqtls"
  "$host_bin" completions zsh >"$stage/usr/share/zsh/vendor-completions/_mqtls"
  "$host_bin" completions fish >"$stage/usr/share/fish/vendor_completions.d/mqtls.fish"
  rm -rf "$tmp"
}

# The Rust crates linked into the binary for $1, with their declared licences.
crate_list() {
  echo "Rust crates linked into /usr/bin/mqtls ($1), with the licence each declares:"
  echo
  cargo tree --locked --edges normal,no-proc-macro --target "$(triple_of "$1")" --prefix none --format '{p} | {l}' |
    sed -e 's/ (\*)//' -e 's/ (\/[^)]*)//' | LC_ALL=C sort -u
}

debian_changelog() {
  local commit
  commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo "unknown")
  cat <<EOF
mqtls ($debversion) unstable; urgency=medium

  * mqtls $version (git $commit), packaged by scripts/package.sh.
    The changes are in /usr/share/doc/mqtls/changelog.gz.

 -- $(sed -n 's/^Maintainer: //p' debian/control)  $(date -R -u -d "@$source_date_epoch")
EOF
}

package() {
  local arch="$1" bin="$2" host_bin="$3" stage dbg doc id gnu
  gnu=$(gnu_of "$arch")
  stage=$(mktemp -d)
  dbg=$(mktemp -d)
  chmod 0755 "$stage" "$dbg"
  umask 022

  # The binary, stripped, with a link to its debug symbols; the symbols go to the -dbgsym package.
  id=$(readelf -n "$bin" | sed -n 's/.*Build ID: \([0-9a-f]*\)/\1/p')
  [ -n "$id" ] || die "$bin has no build id"
  install -d "$stage/usr/bin" "$dbg/usr/lib/debug/.build-id/${id:0:2}"
  local debugfile="$dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
  "$gnu-objcopy" --only-keep-debug --compress-debug-sections "$bin" "$debugfile"
  chmod 0644 "$debugfile"
  "$gnu-strip" --remove-section=.comment --remove-section=.note -o "$stage/usr/bin/mqtls" "$bin"
  "$gnu-objcopy" --add-gnu-debuglink="$debugfile" "$stage/usr/bin/mqtls"
  chmod 0755 "$stage/usr/bin/mqtls"

  # systemd: the units (ExecStart in /usr/bin, where the package puts the binary) and the user.
  install -d "$stage/usr/lib/systemd/system" "$stage/usr/lib/sysusers.d"
  grep -c '^ExecStart=/usr/local/bin/mqtls ' systemd/mqtls.service | grep -qx 1 ||
    die "systemd/mqtls.service: expected one ExecStart=/usr/local/bin/mqtls line"
  sed -e 's|^ExecStart=/usr/local/bin/mqtls |ExecStart=/usr/bin/mqtls |' \
    -e 's|^# mqtls as a systemd service. Install: see systemd/README.md.|# mqtls as a systemd service, from the mqtls package.|' \
    -e '/^Description=/a Documentation=man:mqtls-run(1) file:/usr/share/doc/mqtls/README.systemd.md' \
    systemd/mqtls.service >"$stage/usr/lib/systemd/system/mqtls.service"
  install -m 0644 systemd/mqtls.socket "$stage/usr/lib/systemd/system/mqtls.socket"
  install -m 0644 systemd/mqtls.sysusers.conf "$stage/usr/lib/sysusers.d/mqtls.conf"

  # /etc/mqtls: the commented example as the configuration (a conffile), and the device directory.
  # Group mqtls and the modes 0750/0640 are set by postinst (dpkg-statoverride), once the user exists.
  install -d "$stage/etc/mqtls/devices.d"
  install -m 0644 deploy/mqtls.example.toml "$stage/etc/mqtls/mqtls.toml"

  # Monitoring.
  install -d "$stage/usr/share/mqtls/prometheus" "$stage/usr/share/mqtls/grafana"
  install -m 0644 deploy/prometheus/{prometheus.yml,mqtls.rules.yml,mqtls.rules.test.yml} \
    "$stage/usr/share/mqtls/prometheus/"
  install -m 0644 deploy/grafana/mqtls-dashboard.json "$stage/usr/share/mqtls/grafana/"

  generate_docs "$host_bin" "$stage"

  doc="$stage/usr/share/doc/mqtls"
  install -d "$doc" "$doc/examples" "$stage/usr/share/lintian/overrides"
  install -m 0644 README.md LICENSE debian/copyright "$doc/"
  install -m 0644 systemd/README.md "$doc/README.systemd.md"
  install -m 0644 certs/README.md "$doc/README.certs.md"
  install -m 0644 deploy/prometheus/README.md "$doc/README.prometheus.md"
  install -m 0644 deploy/grafana/README.md "$doc/README.grafana.md"
  install -m 0644 deploy/mqtls.example.toml "$doc/examples/mqtls.example.toml"
  gzip -9n <CHANGELOG.md >"$doc/changelog.gz"
  debian_changelog | gzip -9n >"$doc/changelog.Debian.gz"
  crate_list "$arch" >"$doc/crates.txt"
  install -m 0644 debian/lintian-overrides "$stage/usr/share/lintian/overrides/mqtls"

  install -d "$stage/DEBIAN"
  install -m 0755 debian/postinst debian/prerm debian/postrm "$stage/DEBIAN/"
  (cd "$stage" && find etc -type f -printf '/%p\n' | LC_ALL=C sort) >"$stage/DEBIAN/conffiles"
  sed -e "s/@VERSION@/$debversion/" -e "s/@ARCH@/$arch/" -e "s/@DEPENDS@/$(depends_of "$bin")/" \
    -e "s/@INSTALLED_SIZE@/$(installed_size "$stage")/" debian/control >"$stage/DEBIAN/control"
  md5sums "$stage"

  install -d "$dbg/usr/share/doc" "$dbg/DEBIAN"
  ln -s mqtls "$dbg/usr/share/doc/mqtls-dbgsym"
  cat >"$dbg/DEBIAN/control" <<EOF
Package: mqtls-dbgsym
Source: mqtls
Version: $debversion
Auto-Built-Package: debug-symbols
Architecture: $arch
Maintainer: $(sed -n 's/^Maintainer: //p' debian/control)
Installed-Size: $(installed_size "$dbg")
Depends: mqtls (= $debversion)
Section: debug
Priority: optional
Description: debug symbols for mqtls
Build-Ids: $id
EOF
  md5sums "$dbg"

  mkdir -p "$out"
  build_deb "$stage" "$out/mqtls_${debversion}_$arch.deb"
  build_deb "$dbg" "$out/mqtls-dbgsym_${debversion}_$arch.deb"
  rm -rf "$stage" "$dbg"
  say "$out/mqtls_${debversion}_$arch.deb: $(du -h "$out/mqtls_${debversion}_$arch.deb" | cut -f1)," \
    "binary $(dpkg-deb --fsys-tarfile "$out/mqtls_${debversion}_$arch.deb" | tar -xO ./usr/bin/mqtls | wc -c) bytes stripped;" \
    "debug symbols $(du -h "$out/mqtls-dbgsym_${debversion}_$arch.deb" | cut -f1)"
}

need_debs binutils
host_arch=$(dpkg --print-architecture)
host_bin=$(build "$host_arch")
for arch in "${arches[@]}"; do
  bin=$host_bin
  [ "$arch" = "$host_arch" ] || bin=$(build "$arch")
  package "$arch" "$bin" "$host_bin"
done
