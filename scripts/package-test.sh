#!/usr/bin/env bash
# Tests the Debian packages that scripts/package.sh built, the way an operator meets them. Needs root
# (chroot, mounts, a container).
#
#   scripts/package-test.sh                 the host's architecture (amd64): lintian; in a clean Debian 12
#                                           tree (debootstrap, chroot): install, every file with its owner
#                                           and mode, the user, a conffile edit kept across an upgrade,
#                                           remove, purge; then the service under a booted systemd
#                                           (systemd-nspawn -b): start, a real session, reload with a
#                                           renewed certificate, the watchdog, socket activation, stop
#   scripts/package-test.sh --arch arm64    a foreign architecture: lintian, the same files as the host's
#                                           package, and the binary under qemu-user: --version, certs
#                                           init-ca and issue, check, a real session through Mosquitto
#
# Options: --suite trixie tests in a Debian 13 tree instead of 12 (bookworm); --no-systemd skips the
# booted container. The Debian tree is made once with debootstrap and kept as a tarball in ~/.cache/mqtls
# (MQTLS_DEBIAN_MIRROR picks the mirror).
set -euo pipefail
# A failure inside $(...) stops the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
repo=$PWD

host_arch=$(dpkg --print-architecture)
arch=$host_arch
systemd_phase=1
suite=bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --suite) suite="$2"; shift 2 ;;
    --no-systemd) systemd_phase=0; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "package-test.sh: run as root (it uses chroot and a container)" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || true)
expected_version="mqtls $version${commit:+ (git $commit)}"
deb="target/debian/mqtls_${version}-1_$arch.deb"
dbgsym="target/debian/mqtls-dbgsym_${version}-1_$arch.deb"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/mqtls"
mirror="${MQTLS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
[ -f "$deb" ] && [ -f "$dbgsym" ] || { echo "package-test.sh: no $deb: run scripts/package.sh --arch $arch first" >&2; exit 1; }

work=$(mktemp -d /tmp/mqtls-package-test.XXXXXX)
mounts=()
pids=()
cleanup() {
  local p m
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
  # --one-file-system: never into a mount that is still there.
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

checks=0
phase() { echo "== $*"; }
ok() { checks=$((checks + 1)); echo "  ok  $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
expect_eq() { if [ "$1" = "$2" ]; then ok "$3"; else fail "$3: expected [$2], got [$1]"; fi; }
expect_in() { case "$1" in *"$2"*) ok "$3" ;; *) fail "$3: [$2] not in [$1]" ;; esac; }

# Waits until the shell condition $3 (evaluated anew each time) holds, for at most $1 seconds (a guard,
# not a pass condition). On failure the output of the command in $diagnose, if any, comes with the message.
diagnose=""
wait_for() {
  local limit=$1 what=$2 condition=$3 start=$SECONDS
  until eval "$condition" >/dev/null 2>&1; do
    [ $((SECONDS - start)) -lt "$limit" ] || fail "never: $what (waited ${limit}s)${diagnose:+
$(eval "$diagnose" 2>&1)}"
    sleep 0.2
  done
}

need_debs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "package-test.sh: installing with apt-get: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    [ -z "$(ss -Htan "sport = :$p")" ] && { echo "$p"; return; }
  done
}

http_get() {
  local port=$1 path=$2
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
  cat <&3
  exec 3<&-
}

# The value of one series on mqtls's /metrics (0 if absent).
metric() { http_get "$1" /metrics | awk -v s="$2" '$1 == s { print $2; found = 1 } END { if (!found) print 0 }'; }

# ---------------------------------------------------------------------------------------------------------
# A broker for real sessions: Mosquitto on this machine running the recipe in deploy/mosquitto/ (mutual
# TLS, the certificate's CN as the username, each device publishing only under sensors/<CN>/, `observer`
# reading everything), with its paths and port rewritten as the test suite's harness does. It accepts
# client certificates signed by the CA in $1 (the mqtls CA that issued the devices) and presents a server
# certificate from a throwaway CA (openssl). Sets broker_port, broker_ca, broker_log.

start_broker() {
  local client_ca=$1 d=$work/broker
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=test-broker-ca \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$d/ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
    -extfile "$d/ext" -out "$d/server.pem" 2>/dev/null
  broker_port=$(free_port)
  broker_ca=$d/ca.pem
  broker_log=$d/mosquitto.log
  awk -v port="$broker_port" -v ca="$client_ca" -v cert="$d/server.pem" -v key="$d/server.key" \
    -v acl="$repo/deploy/mosquitto/acl" '
      $1 == "listener" { print "listener", port, "127.0.0.1"; next }
      $1 == "cafile" { print "cafile", ca; next }
      $1 == "certfile" { print "certfile", cert; next }
      $1 == "keyfile" { print "keyfile", key; next }
      $1 == "acl_file" { print "acl_file", acl; next }
      $1 ~ /^(log_dest|log_type|persistence|persistence_location|pid_file|user|include_dir|connection_messages)$/ { next }
      { print }' deploy/mosquitto/mosquitto.conf >"$d/mosquitto.conf"
  # As root, Mosquitto would drop to its own user, which cannot read the keys here.
  printf '%s\n' "persistence false" "log_dest file $broker_log" "log_type all" "connection_messages true" \
    "user root" >>"$d/mosquitto.conf"
  mosquitto -c "$d/mosquitto.conf" >"$d/stdout" 2>&1 &
  pids+=($!)
  wait_for 30 "Mosquitto listening on $broker_port" 'grep -q " running" "$broker_log"'
}

# Publishes through mqtls on $1 as device $2 and checks that an observer at the broker, presenting
# $3/cert.pem and key.pem, receives it.
publish_through() {
  local port=$1 device=$2 observer=$3 message="hello from $2 at $RANDOM" got subscribed_before
  # shellcheck disable=SC2034 # read by the condition below
  subscribed_before=$(grep -c "Received SUBSCRIBE" "$broker_log" || true)
  mosquitto_sub -h 127.0.0.1 -p "$broker_port" --cafile "$broker_ca" --cert "$observer/cert.pem" \
    --key "$observer/key.pem" -i "observer-$RANDOM" -t "sensors/#" -C 1 -W 60 >"$work/received" 2>&1 &
  local sub=$!
  diagnose='cat "$work/received"; tail -n 5 "$broker_log"'
  wait_for 30 "the observer subscribed" '[ "$(grep -c "Received SUBSCRIBE" "$broker_log")" -gt "$subscribed_before" ]'
  diagnose=""
  mosquitto_pub -h 127.0.0.1 -p "$port" -i "$device" -t "sensors/$device/reading" -m "$message" -q 1 ||
    fail "mosquitto_pub through mqtls on $port failed"
  wait "$sub" || fail "the observer got nothing: $(cat "$work/received")"
  got=$(cat "$work/received")
  expect_eq "$got" "$message" "$device published through mqtls; the observer at the broker received it"
  expect_in "$(grep "as $device" "$broker_log" | tail -n1)" "u'$device'" \
    "the broker authenticated the session by $device's own certificate"
}

# ---------------------------------------------------------------------------------------------------------
# A clean Debian 12 tree: debootstrap once (minbase with systemd, for the booted phase), then a tarball.

# procps: the unit's ExecReload= runs /bin/kill, which the package depends on.
tree_packages=systemd,systemd-sysv,dbus,procps

debian_tree() {
  local tarball="$cache/debootstrap/$suite-$host_arch-minbase+$tree_packages.tar.gz" root
  if [ ! -f "$tarball" ]; then
    echo "package-test.sh: making a Debian $suite tree with debootstrap (once; kept in $tarball)" >&2
    local tmp=$work/debootstrap
    debootstrap --variant=minbase --include="$tree_packages" "$suite" "$tmp" "$mirror" >"$work/debootstrap.log" 2>&1 ||
      { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
    mkdir -p "$(dirname "$tarball")"
    tar -C "$tmp" -czf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf --one-file-system "$tmp"
  fi
  root=$(mktemp -d "$work/root.XXXX")
  tar -C "$root" -xzf "$tarball"
  echo "$root"
}

# Every path the package owns that is not a shared directory, with owner, group and mode once installed.
# Directories not listed here must be root:root 0755; anything else the package holds is an error.
expected_files() {
  cat <<'EOF'
/etc/mqtls root:mqtls 750
/etc/mqtls/devices.d root:mqtls 750
/etc/mqtls/mqtls.toml root:mqtls 640
/usr/bin/mqtls root:root 755
/usr/lib/systemd/system/mqtls.service root:root 644
/usr/lib/systemd/system/mqtls.socket root:root 644
/usr/lib/sysusers.d/mqtls.conf root:root 644
/usr/share/bash-completion/completions/mqtls root:root 644
/usr/share/doc/mqtls/LICENSE root:root 644
/usr/share/doc/mqtls/README.certs.md root:root 644
/usr/share/doc/mqtls/README.grafana.md root:root 644
/usr/share/doc/mqtls/README.md root:root 644
/usr/share/doc/mqtls/README.prometheus.md root:root 644
/usr/share/doc/mqtls/README.systemd.md root:root 644
/usr/share/doc/mqtls/changelog.Debian.gz root:root 644
/usr/share/doc/mqtls/changelog.gz root:root 644
/usr/share/doc/mqtls/copyright root:root 644
/usr/share/doc/mqtls/crates.txt root:root 644
/usr/share/doc/mqtls/examples/mqtls.example.toml root:root 644
/usr/share/fish/vendor_completions.d/mqtls.fish root:root 644
/usr/share/lintian/overrides/mqtls root:root 644
/usr/share/man/man1/mqtls-certs-csr.1.gz root:root 644
/usr/share/man/man1/mqtls-certs-init-ca.1.gz root:root 644
/usr/share/man/man1/mqtls-certs-issue.1.gz root:root 644
/usr/share/man/man1/mqtls-certs-list.1.gz root:root 644
/usr/share/man/man1/mqtls-certs.1.gz root:root 644
/usr/share/man/man1/mqtls-check.1.gz root:root 644
/usr/share/man/man1/mqtls-completions.1.gz root:root 644
/usr/share/man/man1/mqtls-man.1.gz root:root 644
/usr/share/man/man1/mqtls-run.1.gz root:root 644
/usr/share/man/man1/mqtls.1.gz root:root 644
/usr/share/mqtls/grafana/mqtls-dashboard.json root:root 644
/usr/share/mqtls/prometheus/mqtls.rules.test.yml root:root 644
/usr/share/mqtls/prometheus/mqtls.rules.yml root:root 644
/usr/share/mqtls/prometheus/prometheus.yml root:root 644
/usr/share/zsh/vendor-completions/_mqtls root:root 644
EOF
}

check_files() {
  local root=$1 path owner mode actual expected listed stats
  listed=$(chroot "$root" dpkg -L mqtls | grep -v '^/\.$' | LC_ALL=C sort)
  # Owners by name as the tree's own /etc/passwd and /etc/group know them.
  stats=$(xargs -d '\n' chroot "$root" stat -c '%n %U:%G %a' <<<"$listed")
  while read -r path owner mode; do
    actual=$(awk -v p="$path" '$1 == p { print $2, $3 }' <<<"$stats")
    [ -n "$actual" ] || fail "$path is not in the package"
    [ "$actual" = "$owner $mode" ] || fail "$path: expected $owner $mode, got $actual"
  done < <(expected_files)
  ok "$(expected_files | wc -l) packaged paths have their owner and mode (/etc/mqtls root:mqtls 0750, mqtls.toml 0640)"
  while read -r path owner mode; do
    expected=$(expected_files | awk -v p="$path" '$1 == p')
    [ -n "$expected" ] && continue
    [ -d "$root$path" ] || fail "$path: in the package but not in the expected list"
    [ "$owner $mode" = "root:root 755" ] || fail "$path: a directory with $owner $mode"
  done <<<"$stats"
  ok "nothing else in the package: $(wc -l <<<"$listed") paths, the rest shared directories root:root 0755"
}

in_root() { chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "${@:2}"; }

check_user() {
  local root=$1 how=$2 entry uid gid home shell group
  entry=$(in_root "$root" getent passwd mqtls) || fail "no user mqtls"
  IFS=: read -r _ _ uid gid _ home shell <<<"$entry"
  group=$(in_root "$root" getent group "$gid" | cut -d: -f1)
  [ "$uid" -lt 1000 ] && [ "$group" = mqtls ] && [ "$home" = / ] && [ "$shell" = /usr/sbin/nologin ] ||
    fail "user mqtls ($how): $entry (group $group)"
  ok "user mqtls made by $how: system uid $uid, group mqtls, home /, shell /usr/sbin/nologin"
}

chroot_phase() {
  phase "the package in a clean Debian $suite tree (chroot)"
  local root out
  root=$(debian_tree)
  mount -t proc proc "$root/proc" && mounts+=("$root/proc")
  cp "$deb" "$root/tmp/mqtls.deb"
  cp "$dbgsym" "$root/tmp/mqtls-dbgsym.deb"
  cp "$work/newer/mqtls_${version}-2_$arch.deb" "$root/tmp/mqtls-newer.deb"

  # As the README says: apt installs the file and what it depends on (all in the tree already).
  out=$(in_root "$root" apt-get install -y /tmp/mqtls.deb /tmp/mqtls-dbgsym.deb </dev/null 2>&1) ||
    fail "apt-get install ./mqtls.deb: $out"
  expect_eq "$(in_root "$root" dpkg-query -W -f='${Status} ${Version}' mqtls)" "install ok installed $version-1" "apt-get install ./mqtls_$version-1_$arch.deb installs it"
  expect_in "$out" "then 'sudo systemctl enable --now mqtls'" "the first install says what to do next"
  check_files "$root"
  check_user "$root" "systemd-sysusers"
  expect_in "$(in_root "$root" dpkg-query -W -f='${Conffiles}' mqtls)" "/etc/mqtls/mqtls.toml " "/etc/mqtls/mqtls.toml is a conffile"
  expect_eq "$(in_root "$root" dpkg-statoverride --list | grep /etc/mqtls | LC_ALL=C sort | tr '\n' ';')" \
    "root mqtls 640 /etc/mqtls/mqtls.toml;root mqtls 750 /etc/mqtls;root mqtls 750 /etc/mqtls/devices.d;" \
    "the modes are dpkg-statoverride records, so a later unpack keeps them"
  expect_eq "$(in_root "$root" mqtls --version)" "$expected_version" "mqtls --version names the release and the commit"
  local id
  id=$(readelf -n "$root/usr/bin/mqtls" | sed -n 's/.*Build ID: \([0-9a-f]*\)/\1/p')
  [ -f "$root/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug" ] || fail "no debug file for build id $id"
  readelf -S "$root/usr/bin/mqtls" | grep -q '\.symtab' && fail "/usr/bin/mqtls still has a symbol table"
  ok "the binary is stripped; mqtls-dbgsym holds its symbols under its build id $id"
  local page
  for page in "$root"/usr/share/man/man1/mqtls*.gz; do
    zcat "$page" | grep -q '^\.TH ' || fail "$page is not a manual page"
  done
  ok "$(ls "$root"/usr/share/man/man1/mqtls*.gz | wc -l) manual pages"
  expect_in "$(in_root "$root" bash -c 'source /usr/share/bash-completion/completions/mqtls && complete -p mqtls')" \
    "_mqtls" "bash loads the completion"
  out=$(in_root "$root" systemd-analyze verify --man=no /usr/lib/systemd/system/mqtls.service /usr/lib/systemd/system/mqtls.socket 2>&1) ||
    fail "systemd-analyze verify: $out"
  expect_in "$(grep '^ExecStart=' "$root/usr/lib/systemd/system/mqtls.service")" "/usr/bin/mqtls run" "the unit runs /usr/bin/mqtls; systemd-analyze verify accepts both units"

  # The shipped example names certificates that do not exist: check says so, and so would the service.
  out=$(in_root "$root" mqtls check 2>&1) && fail "check accepted the shipped example"
  expect_in "$out" "/etc/mqtls/devices/boiler-1/cert.pem: cannot read" "check refuses the shipped example until it is edited"

  # The operator's way (README): a CA, a device issued into devices.d for the mqtls user, a config.
  in_root "$root" mqtls certs init-ca --out /root/ca >/dev/null
  in_root "$root" mqtls certs issue --ca /root/ca --out /etc/mqtls/devices.d --owner mqtls sensor-1 >/dev/null
  install -m 0644 "$root/root/ca/ca.pem" "$root/etc/mqtls/broker-ca.pem"
  cat >"$root/etc/mqtls/mqtls.toml" <<EOF
# Edited by the operator (package-test.sh).
[upstream]
address = "broker.example.com"
ca_file = "/etc/mqtls/broker-ca.pem"
[device_dir]
path = "/etc/mqtls/devices.d"
EOF
  out=$(in_root "$root" runuser -u mqtls -- mqtls check 2>&1) || fail "check as mqtls: $out"
  expect_in "$out" "OK: 1 device(s)" "as the mqtls user, check reads the configuration and the device's key"
  out=$(in_root "$root" runuser -u nobody -- mqtls check 2>&1) && fail "nobody could read /etc/mqtls: $out"
  expect_in "$out" "ermission denied" "another user cannot read /etc/mqtls"
  local conf_sum key_sum
  conf_sum=$(sha256sum <"$root/etc/mqtls/mqtls.toml")
  key_sum=$(sha256sum <"$root/etc/mqtls/devices.d/sensor-1/key.pem")

  phase "upgrade to a newer build"
  out=$(in_root "$root" dpkg -i /tmp/mqtls-newer.deb </dev/null 2>&1) || fail "dpkg -i (upgrade): $out"
  expect_eq "$(in_root "$root" dpkg-query -W -f='${Version}' mqtls)" "$version-2" "upgraded"
  expect_eq "$(sha256sum <"$root/etc/mqtls/mqtls.toml")" "$conf_sum" "the edited /etc/mqtls/mqtls.toml is kept, without a question"
  [ -z "$(find "$root/etc/mqtls" -name '*.dpkg-*')" ] || fail "dpkg left $(find "$root/etc/mqtls" -name '*.dpkg-*')"
  expect_eq "$(in_root "$root" stat -c '%U:%G %a' /etc/mqtls /etc/mqtls/mqtls.toml | tr '\n' ';')" \
    "root:mqtls 750;root:mqtls 640;" "owners and modes in /etc/mqtls survive the upgrade"
  expect_eq "$(sha256sum <"$root/etc/mqtls/devices.d/sensor-1/key.pem") $(in_root "$root" stat -c '%U %a' /etc/mqtls/devices.d/sensor-1/key.pem)" \
    "$key_sum mqtls 600" "the device key is untouched"

  phase "remove"
  in_root "$root" apt-get remove -y mqtls-dbgsym mqtls </dev/null >/dev/null 2>&1 || fail "apt-get remove"
  expect_eq "$(in_root "$root" dpkg-query -W -f='${Status}' mqtls)" "deinstall ok config-files" "removed; its configuration stays"
  [ ! -e "$root/usr/bin/mqtls" ] && [ ! -e "$root/usr/lib/systemd/system/mqtls.service" ] || fail "files left after remove"
  expect_eq "$(sha256sum <"$root/etc/mqtls/mqtls.toml")" "$conf_sum" "remove keeps /etc/mqtls/mqtls.toml"
  [ -f "$root/etc/mqtls/devices.d/sensor-1/key.pem" ] && in_root "$root" getent passwd mqtls >/dev/null || fail "remove took keys or the user"
  ok "remove keeps the device keys and the user"

  phase "purge"
  in_root "$root" apt-get purge -y mqtls </dev/null >/dev/null 2>&1 || fail "apt-get purge"
  expect_eq "$(in_root "$root" dpkg-query -W -f='${Status}' mqtls 2>/dev/null || echo gone)" "gone" "purged"
  [ ! -e "$root/etc/mqtls/mqtls.toml" ] || fail "purge left /etc/mqtls/mqtls.toml"
  ok "purge removes /etc/mqtls/mqtls.toml"
  expect_eq "$(sha256sum <"$root/etc/mqtls/devices.d/sensor-1/key.pem")" "$key_sum" "purge keeps the device keys the operator added"
  expect_eq "$(in_root "$root" dpkg-statoverride --list | grep -c /etc/mqtls || true)" "0" "purge removes the statoverride records"
  in_root "$root" getent passwd mqtls >/dev/null || fail "purge removed the user"
  ok "purge keeps the mqtls user (it may still own files)"

  phase "a system without systemd-sysusers, and a purge with nothing added"
  in_root "$root" userdel mqtls
  rm -rf "$root/etc/mqtls"
  in_root "$root" dpkg-divert --quiet --local --rename --divert /usr/bin/systemd-sysusers.hidden --add /usr/bin/systemd-sysusers
  out=$(in_root "$root" dpkg -i /tmp/mqtls.deb </dev/null 2>&1) || fail "dpkg -i without systemd-sysusers: $out"
  check_user "$root" "useradd"
  in_root "$root" dpkg -P mqtls </dev/null >/dev/null 2>&1 || fail "dpkg -P"
  [ ! -e "$root/etc/mqtls" ] || fail "purge left $(find "$root/etc/mqtls")"
  ok "purge of an untouched install leaves no /etc/mqtls"
  in_root "$root" dpkg-divert --quiet --local --rename --remove /usr/bin/systemd-sysusers
}

# ---------------------------------------------------------------------------------------------------------
# The service under a booted systemd: systemd-nspawn -b on a copy of the tree, sharing this machine's
# network (the broker runs here). Commands run inside through nsenter, as no systemd on this machine
# could relay them.

ct() { nsenter -t "$ct_pid" -m -u -i -n -p -- /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
prop() { ct systemctl show -P "$2" "$1"; }

systemd_phase() {
  phase "the service under a booted systemd (systemd-nspawn -b)"
  local root out port metrics nspawn
  root=$(debian_tree)
  cp "$deb" "$root/root/mqtls.deb"
  systemd-nspawn --quiet --keep-unit --register=no --console=pipe -b -D "$root" \
    --machine="mqtls-test-$$" >"$work/nspawn.log" 2>&1 </dev/null &
  nspawn=$!
  pids+=("$nspawn")
  wait_for 30 "the container's init" 'pgrep -P "$nspawn"'
  ct_pid=$(pgrep -P "$nspawn" | head -n1)
  local state
  state=$(timeout 120 nsenter -t "$ct_pid" -m -u -i -n -p -- systemctl is-system-running --wait 2>/dev/null || true)
  [ "$state" = running ] || fail "the container's systemd is $state: $(ct systemctl --failed --no-pager 2>&1)"
  ok "systemd $(ct systemctl --version | head -n1 | cut -d' ' -f2) booted in the container"

  out=$(ct dpkg -i /root/mqtls.deb </dev/null 2>&1) || fail "dpkg -i in the container: $out"
  expect_eq "$(prop mqtls.service UnitFileState) $(prop mqtls.service ActiveState) $(prop mqtls.socket UnitFileState)" \
    "disabled inactive disabled" "installed under systemd: the service and the socket are neither enabled nor started"

  ct mqtls certs init-ca --out /root/ca >/dev/null
  ct mqtls certs issue --ca /root/ca --out /etc/mqtls/devices.d --owner mqtls sensor-1 >/dev/null
  ct mqtls certs issue --ca /root/ca --out /root/clients observer >/dev/null
  start_broker "$root/root/ca/ca.pem"
  install -m 0644 "$broker_ca" "$root/etc/mqtls/broker-ca.pem"
  port=$(free_port)
  metrics=$(free_port)
  cat >"$root/etc/mqtls/mqtls.toml" <<EOF
[listen]
address = "127.0.0.1:$port"
[upstream]
address = "127.0.0.1:$broker_port"
server_name = "localhost"
ca_file = "/etc/mqtls/broker-ca.pem"
[device_dir]
path = "/etc/mqtls/devices.d"
[metrics]
address = "127.0.0.1:$metrics"
EOF
  out=$(ct runuser -u mqtls -- mqtls check 2>&1) || fail "check: $out"
  ct systemctl enable --now mqtls.service >/dev/null 2>&1 || fail "systemctl enable --now: $(ct journalctl -u mqtls --no-pager | tail -n 20)"
  expect_eq "$(prop mqtls.service ActiveState)" active "systemctl enable --now mqtls: active once READY=1 came"
  expect_eq "$(prop mqtls.service StatusText)" "serving 1 device(s) on 127.0.0.1:$port" "systemctl status shows what it serves"
  local pid
  pid=$(prop mqtls.service MainPID)
  expect_eq "$(ct stat -c %U "/proc/$pid")" mqtls "it runs as the mqtls user"
  rss_kib=$(ct awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
  ok "resident memory once ready under systemd, one device: ${rss_kib} KiB"
  publish_through "$port" sensor-1 "$root/root/clients/observer"

  # Reload: a renewed certificate (new key too), then systemctl reload. The file watcher may get there
  # first; either way the reload that renews sensor-1 is logged and counted.
  local reloads
  # shellcheck disable=SC2034 # read by a wait_for condition
  reloads=$(metric "$metrics" 'mqtls_config_reloads_total{result="success"}')
  ct mqtls certs issue --ca /root/ca --out /etc/mqtls/devices.d --owner mqtls --force sensor-1 >/dev/null
  ct systemctl reload mqtls.service || fail "systemctl reload"
  wait_for 30 "a reload that renewed sensor-1" 'ct journalctl -u mqtls --no-pager | grep "configuration reloaded" | grep -q "renewed=sensor-1"'
  wait_for 30 "the reload counted" '[ "$(metric "$metrics" "mqtls_config_reloads_total{result=\"success\"}")" -gt "$reloads" ]'
  expect_eq "$(prop mqtls.service ActiveState) $(prop mqtls.service MainPID)" "active $pid" "systemctl reload: the renewed certificate is in force, same process"
  publish_through "$port" sensor-1 "$root/root/clients/observer"

  # The watchdog: pings arrive; a process that stops answering is killed and restarted.
  mkdir -p "$root/etc/systemd/system/mqtls.service.d"
  printf '[Service]\nWatchdogSec=2s\nTimeoutAbortSec=5s\n' >"$root/etc/systemd/system/mqtls.service.d/watchdog.conf"
  ct systemctl daemon-reload
  ct systemctl restart mqtls.service
  pid=$(prop mqtls.service MainPID)
  local first
  # shellcheck disable=SC2034 # read by a wait_for condition
  first=$(prop mqtls.service WatchdogTimestampMonotonic)
  wait_for 20 "a second watchdog ping" '[ "$(prop mqtls.service WatchdogTimestampMonotonic)" -gt "$first" ]'
  ok "WatchdogSec=2s: systemd receives the pings"
  ct bash -c "kill -STOP $pid"
  wait_for 60 "a restart after the watchdog fired" '[ "$(prop mqtls.service NRestarts)" -ge 1 ]'
  wait_for 30 "active again" '[ "$(prop mqtls.service ActiveState)" = active ]'
  expect_in "$(ct journalctl -u mqtls --no-pager)" "Watchdog timeout" "a frozen mqtls misses its pings: systemd kills it (watchdog timeout) and starts it again"
  rm -r "$root/etc/systemd/system/mqtls.service.d"
  ct systemctl daemon-reload

  # Stop: SIGTERM, drain, exit 0.
  ct systemctl stop mqtls.service
  expect_eq "$(prop mqtls.service ActiveState) $(prop mqtls.service Result) $(prop mqtls.service ExecMainStatus)" \
    "inactive success 0" "systemctl stop: mqtls drains and exits 0"

  # Socket activation: the socket unit listening where mqtls.toml says; the first device starts mqtls.
  mkdir -p "$root/etc/systemd/system/mqtls.socket.d"
  printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:%s\n' "$port" >"$root/etc/systemd/system/mqtls.socket.d/address.conf"
  ct systemctl daemon-reload
  ct systemctl start mqtls.socket
  expect_eq "$(prop mqtls.socket ActiveState) $(prop mqtls.service ActiveState)" "active inactive" "socket unit listening, service not started"
  publish_through "$port" sensor-1 "$root/root/clients/observer"
  expect_eq "$(prop mqtls.service ActiveState)" active "a device's connection started mqtls through the socket"
  ct systemctl enable mqtls.socket >/dev/null 2>&1

  # Removal under systemd stops both units; purge removes the enablement links made by systemctl enable.
  # (The drop-in is this test's, as an operator's would be: purge leaves those.)
  rm -r "$root/etc/systemd/system/mqtls.socket.d"
  out=$(ct dpkg -r mqtls </dev/null 2>&1) || fail "dpkg -r: $out"
  expect_eq "$(prop mqtls.service ActiveState) $(prop mqtls.socket ActiveState)" "inactive inactive" "dpkg -r stops the service and the socket"
  ct dpkg -P mqtls </dev/null >/dev/null 2>&1 || fail "dpkg -P"
  [ -z "$(find "$root/etc/systemd/system" -name 'mqtls.*' -print -quit)" ] || fail "links left: $(find "$root/etc/systemd/system" -name 'mqtls.*')"
  ok "dpkg -P removes the enablement links"

  ct systemctl poweroff >/dev/null 2>&1 || true
  wait_for 60 "the container to stop" '! kill -0 "$nspawn" 2>/dev/null'
}

# ---------------------------------------------------------------------------------------------------------
# A foreign architecture: the package holds what the host's does; the binary works under qemu-user.

foreign_phase() {
  phase "the $arch package beside the $host_arch one"
  local host_deb="target/debian/mqtls_${version}-1_$host_arch.deb"
  [ -f "$host_deb" ] || fail "no $host_deb to compare with: scripts/package.sh --arch $host_arch"
  listing() { dpkg-deb -c "$1" | awk '{ print $1, $2, $6 }' | grep -v ' ./usr/bin/mqtls$'; }
  [ "$(listing "$deb")" = "$(listing "$host_deb")" ] || fail "the packages differ: $(diff <(listing "$host_deb") <(listing "$deb"))"
  ok "the same files, owners and modes as the $host_arch package"
  expect_eq "$(dpkg-deb -f "$deb" Architecture)" "$arch" "Architecture: $arch"
  local gnu qemu bin
  case "$arch" in
    arm64) gnu=aarch64-linux-gnu; qemu="qemu-aarch64" ;;
    armhf) gnu=arm-linux-gnueabihf; qemu="qemu-arm" ;;
    *) fail "no emulator known for $arch" ;;
  esac
  need_debs qemu-user "libc6-$arch-cross" "libgcc-s1-$arch-cross"
  bin=$work/mqtls-$arch
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/mqtls >"$bin"
  chmod 0755 "$bin"
  expect_in "$(readelf -h "$bin" | grep Machine)" "$( [ "$arch" = arm64 ] && echo AArch64 || echo ARM)" "the packaged binary is for $arch"

  phase "the $arch binary under $qemu"
  mq() { "$qemu" -L "/usr/$gnu" "$bin" "$@"; }
  expect_eq "$(mq --version)" "$expected_version" "--version"
  mq certs init-ca --out "$work/ca" >/dev/null
  mq certs issue --ca "$work/ca" --out "$work/devices.d" sensor-1 >/dev/null
  mq certs issue --ca "$work/ca" --out "$work/clients" observer >/dev/null
  expect_in "$(mq certs list --dir "$work/devices.d")" "sensor-1" "certs init-ca, issue and list"
  start_broker "$work/ca/ca.pem"
  local port metrics
  port=$(free_port)
  metrics=$(free_port)
  cat >"$work/mqtls.toml" <<EOF
[listen]
address = "127.0.0.1:$port"
[upstream]
address = "127.0.0.1:$broker_port"
server_name = "localhost"
ca_file = "$broker_ca"
[device_dir]
path = "$work/devices.d"
[metrics]
address = "127.0.0.1:$metrics"
EOF
  expect_in "$(mq check --config "$work/mqtls.toml" 2>&1)" "OK: 1 device(s)" "check"
  "$qemu" -L "/usr/$gnu" "$bin" run --config "$work/mqtls.toml" 2>"$work/mqtls.log" &
  local pid=$!
  pids+=("$pid")
  wait_for 60 "mqtls ready under emulation" 'grep -q "mqtls ready" "$work/mqtls.log"'
  rss_kib=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
  ok "resident memory once ready under $qemu, one device (the emulator's own included): ${rss_kib} KiB"
  publish_through "$port" sensor-1 "$work/clients/observer"
  [ "$(metric "$metrics" 'mqtls_bytes_total{device="sensor-1",direction="to_broker"}')" -gt 0 ] || fail "no bytes counted"
  ok "the metrics endpoint counted sensor-1's bytes"
  kill -TERM "$pid"
  wait "$pid" || fail "mqtls exited with $? after SIGTERM: $(tail -n 5 "$work/mqtls.log")"
  ok "SIGTERM: drained and exited 0"
}

lintian_phase() {
  phase "lintian"
  need_debs lintian
  local out noise
  out=$(lintian --display-level '>=pedantic' --display-experimental "$deb" "$dbgsym" 2>&1 |
    grep -v '^running with root privileges') || true
  # The spelling check reads the compiled binary, whose machine code holds byte runs that look like
  # misspelt words, different on each architecture ("thIk" in one amd64 build): shown, not counted.
  noise=$(grep '^I: mqtls: spelling-error-in-binary .* \[usr/bin/mqtls\]$' <<<"$out" || true)
  out=$(grep -v '^I: mqtls: spelling-error-in-binary .* \[usr/bin/mqtls\]$' <<<"$out" || true)
  [ -z "$noise" ] || echo "  note (not counted): $noise"
  [ -z "$out" ] || fail "lintian: $out"
  ok "lintian: no tag at any level up to pedantic (overrides explained in debian/lintian-overrides)"
}

need_debs debootstrap systemd-container mosquitto mosquitto-clients openssl iproute2
lintian_phase
if [ "$arch" = "$host_arch" ]; then
  mkdir -p "$work/newer"
  bash scripts/package.sh --arch "$arch" --revision 2 --out "$work/newer" 2>/dev/null
  chroot_phase
  if [ "$systemd_phase" = 1 ]; then
    systemd_phase
  fi
else
  foreign_phase
fi
echo "package-test.sh: $arch${suite:+ on $suite}: all $checks checks passed"
