#!/usr/bin/env bash
# Build the .deb, install it with dpkg (root; CI runs as root), check that every file is
# where and how it should be, run the installed binaries, then remove and purge it.
#   scripts/test-deb.sh                 # build (scripts/deb.sh) + test
#   DEB=path/to.deb scripts/test-deb.sh # test an existing package
# Refuses to run when dps-station is already installed from elsewhere (FORCE=1 overrides):
# the purge at the end would remove that installation's config.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

if [ "$(id -u)" != 0 ]; then
    echo "test-deb: needs root (dpkg -i); try: sudo $0" >&2
    exit 2
fi
if dpkg-query -W -f='${Status}' dps-station 2>/dev/null | grep -q 'install ok'; then
    if [ -z "${FORCE:-}" ]; then
        echo "test-deb: dps-station is already installed here; FORCE=1 to test anyway (it will be purged)" >&2
        exit 2
    fi
fi

deb="${DEB:-}"
if [ -z "$deb" ]; then
    deb=$(scripts/deb.sh | tail -n1)
fi
echo "test-deb: testing $deb"

fails=0
ok()   { echo "  ok   $*"; }
bad()  { echo "  FAIL $*"; fails=$((fails + 1)); }
# expect_file PATH MODE OWNER:GROUP
expect_file() {
    if [ ! -e "$1" ]; then bad "$1 missing"; return; fi
    local got
    got=$(stat -c '%a %U:%G' "$1")
    if [ "$got" = "$2 $3" ]; then ok "$1 $got"; else bad "$1 is $got, want $2 $3"; fi
}

cleanup() {
    # Leave the machine as we found it even when an assertion aborted the script.
    if dpkg-query -W -f='${Status}' dps-station 2>/dev/null | grep -q 'installed'; then
        dpkg -P dps-station >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

echo "== package contents"
contents=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/dps-station ./usr/bin/dps-emulator ./lib/systemd/system/dps-station.service \
         ./usr/lib/sysusers.d/dps-station.conf ./usr/lib/tmpfiles.d/dps-station.conf \
         ./etc/dps-station/station.toml ./usr/share/doc/dps-station/README.Debian \
         ./usr/share/doc/dps-station/operator-guide.md; do
    if grep -qF " $f" <<<"$contents"; then ok "carries $f"; else bad "does not carry $f"; fi
done
if dpkg-deb --field "$deb" Depends | grep -q 'libtss2-esys-3.0.2-0'; then ok "Depends names libtss2-esys-3.0.2-0"; else bad "Depends: $(dpkg-deb --field "$deb" Depends)"; fi

echo "== dpkg -i"
if ! dpkg -i "$deb"; then
    bad "dpkg -i failed (missing dependencies? apt-get install -f)"
    exit 1
fi

echo "== installed files"
expect_file /usr/bin/dps-station 755 root:root
expect_file /usr/bin/dps-emulator 755 root:root
expect_file /lib/systemd/system/dps-station.service 644 root:root
expect_file /usr/lib/sysusers.d/dps-station.conf 644 root:root
expect_file /usr/lib/tmpfiles.d/dps-station.conf 644 root:root
expect_file /etc/dps-station 750 root:dps-station
expect_file /etc/dps-station/station.toml 640 root:dps-station
expect_file /var/lib/dps-station 700 dps-station:dps-station
expect_file /usr/share/doc/dps-station/README.Debian 644 root:root
if dpkg-query -W -f='${Conffiles}\n' dps-station | grep -q '/etc/dps-station/station.toml'; then
    ok "station.toml is a conffile"
else
    bad "station.toml is not a conffile"
fi
if id dps-station >/dev/null 2>&1; then
    ok "user dps-station: $(id dps-station)"
    for g in tss dialout; do
        if getent group "$g" >/dev/null && ! id -nG dps-station | tr ' ' '\n' | grep -qx "$g"; then
            bad "dps-station is not in group $g"
        fi
    done
else
    bad "user dps-station was not created"
fi
if command -v systemd-analyze >/dev/null 2>&1; then
    if systemd-analyze verify /lib/systemd/system/dps-station.service 2>/tmp/test-deb-verify.$$; then
        ok "systemd-analyze verify"
    else
        # Environments without a running systemd can still verify; report what it said.
        bad "systemd-analyze verify: $(tr '\n' ' ' </tmp/test-deb-verify.$$)"
    fi
    rm -f /tmp/test-deb-verify.$$
fi

echo "== run the installed binaries"
v=$(/usr/bin/dps-station --version)
want="dps-station $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
if [ "$v" = "$want" ]; then ok "--version: $v"; else bad "--version said '$v', want '$want'"; fi
if /usr/bin/dps-emulator --help >/dev/null; then ok "dps-emulator --help"; else bad "dps-emulator --help"; fi

# The shipped config names a hardware TPM, a scanner port, a CA and a credential that do not
# exist here: check must print its checklist and exit 1 (not 2: the config itself is valid;
# not a crash).
set +e
out=$(timeout 120 /usr/bin/dps-station check --config /etc/dps-station/station.toml 2>&1)
rc=$?
set -e
echo "$out" | sed 's/^/    | /'
case "$rc" in
    1) ok "check exits 1 (items failed, as expected without TPM/scanner/DPS)" ;;
    0) bad "check exited 0 on a station with no TPM, scanner or DPS" ;;
    *) bad "check exited $rc (2 = config refused, 101 = panic, >128 = signal)" ;;
esac
if grep -qi 'panicked' <<<"$out"; then bad "check panicked"; fi
for item in config state tpm scanner dps; do
    if grep -qi "$item" <<<"$out"; then ok "checklist mentions $item"; else bad "checklist has no $item line"; fi
done

echo "== dpkg -r (keeps conffiles), then purge"
dpkg -r dps-station >/dev/null
[ ! -e /usr/bin/dps-station ] && ok "binary removed" || bad "binary still there after dpkg -r"
[ -e /etc/dps-station/station.toml ] && ok "conffile kept by remove" || bad "conffile gone after dpkg -r"
dpkg -P dps-station >/dev/null
[ ! -e /etc/dps-station/station.toml ] && ok "conffile removed by purge" || bad "conffile survived purge"
[ -d /var/lib/dps-station ] && ok "board database directory kept by purge" || bad "purge removed /var/lib/dps-station"
rmdir /var/lib/dps-station/dice /var/lib/dps-station /etc/dps-station/ca /etc/dps-station 2>/dev/null || true

echo "test-deb: $fails failed, $(( $(date +%s) - start )) s"
[ "$fails" = 0 ]
