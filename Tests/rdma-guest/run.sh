#!/usr/bin/env bash
# RDMA for real without RDMA hardware: boots Debian's own kernel under QEMU
# (software emulation, -accel tcg) with the Soft-RoCE driver (rdma_rxe) on a
# veth pair, and runs the RDMA tests inside. Only Debian packages, fetched
# with apt: the kernel package is downloaded and unpacked here, never
# installed on this machine.
#
#   bash Tests/rdma-guest/run.sh            # prints "RDMA-GUEST-RESULT: pass|fail …"
#
# Exit 0 when every guest test passed, 1 when one failed, 0 with a printed
# "RDMA guest tests skipped: <reason>" where QEMU or the packages cannot be
# had (never silently). Environment: RDMA_GUEST_WORK (default
# .build-rdma-guest), RDMA_GUEST_TIMEOUT (seconds, default 900).
set -euo pipefail
cd "$(dirname "$0")/../.."
repository=$PWD
work=${RDMA_GUEST_WORK:-$repository/.build-rdma-guest}
timeout_s=${RDMA_GUEST_TIMEOUT:-900}
started=$(date +%s)
skip() { echo "RDMA guest tests skipped: $*"; exit 0; }

# 1. Packages: QEMU, busybox, iproute2 (ip and rdma), the verbs libraries and
#    the rxe provider. Installed when missing and we may; else a printed skip.
packages=(qemu-system-x86 busybox-static iproute2 rdma-core ibverbs-providers libibverbs1 librdmacm1 libibverbs-dev librdmacm-dev cpio xz-utils zstd gcc)
missing=()
for package in "${packages[@]}"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || skip "packages ${missing[*]} are missing and this user cannot install them"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null || skip "apt-get could not install ${missing[*]}"
fi
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 is not available"

# 2. The kernel: the package linux-image-amd64 depends on, downloaded and unpacked.
mkdir -p "$work"
kernel_package=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$kernel_package" ] || skip "apt knows no linux-image-amd64"
if [ ! -d "$work/kernel/$kernel_package" ]; then
    rm -rf "$work/kernel" && mkdir -p "$work/kernel/download"
    (cd "$work/kernel/download" && apt-get download "$kernel_package" >/dev/null 2>&1) || skip "apt-get download $kernel_package failed"
    dpkg -x "$work"/kernel/download/*.deb "$work/kernel/$kernel_package"
fi
kernel_root=$work/kernel/$kernel_package
vmlinuz=$(ls "$kernel_root"/boot/vmlinuz-*)
modules=$(ls -d "$kernel_root"/lib/modules/*)

# 3. The guest's root file system, as an initramfs.
root=$work/root
rm -rf "$root" && mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc/libibverbs.d,lib/modules,tests}
cp /bin/busybox "$root/bin/busybox"
for applet in sh mount mkdir echo cat ls sleep poweroff dmesg uname true timeout; do ln -s busybox "$root/bin/$applet"; done
copy_with_libraries() {  # a binary (or library) and every shared library it loads
    local file=$1 target=$2
    mkdir -p "$(dirname "$root$target")" && cp -L "$file" "$root$target"
    ldd "$file" 2>/dev/null | grep -o '/[^ )]*' | while read -r library; do
        [ -e "$root$library" ] || { mkdir -p "$(dirname "$root$library")" && cp -L "$library" "$root$library"; }
    done
}
copy_with_libraries "$(command -v ip)" /sbin/ip
copy_with_libraries "$(command -v rdma)" /sbin/rdma
provider=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so)
copy_with_libraries "$provider" "$provider"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
gcc -O2 -Wall -o "$work/rdma_smoke" Tests/rdma-guest/rdma_smoke.c -lrdmacm -libverbs
copy_with_libraries "$work/rdma_smoke" /tests/rdma_smoke
# The Swift RDMA transport's checks and the daemon they start (and the Swift runtime they load).
swift build --product rdma-guest-test >/dev/null
swift build --product snapshotd >/dev/null
bin=$(swift build --show-bin-path)
copy_with_libraries "$bin/rdma-guest-test" /tests/rdma-guest-test
copy_with_libraries "$bin/snapshotd" /tests/snapshotd
# The modules, in load order (without crc32_generic, adding the rxe link fails);
# one built into this kernel is skipped.
order="crc32_generic configfs ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe ib_cm iw_cm rdma_cm rdma_ucm veth"
loaded=""
for module in $order; do
    file=$(find "$modules" -name "$module.ko" -o -name "$module.ko.xz" -o -name "$module.ko.zst" | head -1)
    if [ -z "$file" ]; then
        grep -q "/$module.ko" "$modules/modules.builtin" || { echo "RDMA-GUEST-RESULT: fail (module $module not found in $kernel_package)"; exit 1; }
        continue
    fi
    case "$file" in
    *.xz) xz -dc "$file" >"$root/lib/modules/$module.ko" ;;
    *.zst) zstd -qdc "$file" >"$root/lib/modules/$module.ko" ;;
    *) cp "$file" "$root/lib/modules/$module.ko" ;;
    esac
    loaded="$loaded $module"
done
cat >"$root/init" <<GUEST
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
export PATH=/bin:/sbin LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
result() { echo "RDMA-GUEST-RESULT: \$*"; poweroff -f; }
# Absolute paths: busybox's shell runs its own applets first, and its ip cannot create veth.
for module in $loaded; do
    insmod /lib/modules/\$module.ko || result "fail (insmod \$module)"
done
/sbin/ip link set lo up
/sbin/ip link add veth0 type veth peer name veth1 || result "fail (ip link add veth)"
/sbin/ip addr add 10.77.0.1/24 dev veth0 && /sbin/ip addr add 10.77.0.2/24 dev veth1
/sbin/ip link set veth0 up && /sbin/ip link set veth1 up
# Both ends live in this namespace (rxe in this kernel listens for RoCE in the
# initial namespace only), so make traffic between the two local addresses
# cross the veth pair instead of lo: locally sent packets to the other end's
# address go out of this end, and arrive as from a local address.
for setting in all/accept_local veth0/accept_local veth1/accept_local; do echo 1 >/proc/sys/net/ipv4/conf/\$setting; done
for setting in all/rp_filter veth0/rp_filter veth1/rp_filter; do echo 0 >/proc/sys/net/ipv4/conf/\$setting; done
/sbin/ip route add 10.77.0.2 dev veth0 src 10.77.0.1 table 100
/sbin/ip route add 10.77.0.1 dev veth1 src 10.77.0.2 table 101
/sbin/ip rule add pref 100 to 10.77.0.2 iif lo table 100
/sbin/ip rule add pref 101 to 10.77.0.1 iif lo table 101
/sbin/rdma link add rxe0 type rxe netdev veth0 || result "fail (rdma link add rxe0)"
/sbin/rdma link add rxe1 type rxe netdev veth1 || result "fail (rdma link add rxe1)"
/sbin/rdma link show
timeout 120 /tests/rdma_smoke server 10.77.0.2 &
server=\$!
sleep 1
timeout 120 /tests/rdma_smoke client 10.77.0.1 10.77.0.2 || result "fail (rdma_smoke client)"
wait \$server || result "fail (rdma_smoke server)"
for scenario in ok corrupt disconnect; do
    timeout 120 /tests/rdma-guest-test server 10.77.0.2 \$scenario &
    server=\$!
    sleep 2
    timeout 120 /tests/rdma-guest-test client 10.77.0.1 10.77.0.2 \$scenario || result "fail (rdma-guest-test client \$scenario)"
    wait \$server || result "fail (rdma-guest-test server \$scenario)"
done
# Two real daemons and their trainers over RDMA: saves, restores, fragments, a rebuild.
timeout 600 /tests/rdma-guest-test daemons /tests/snapshotd || { tail -40 /tmp/rdma-daemons/node0.log; tail -40 /tmp/rdma-daemons/node1.log; result "fail (rdma-guest-test daemons)"; }
result "pass (rdma_smoke; rdma-guest-test ok, corrupt, disconnect; daemons save-restore, corrupt, disconnect, dead-daemon, rebuild, auto-fallback)"
GUEST
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

# 4. Boot, and read the verdict from the serial console.
echo "booting $kernel_package under QEMU (TCG) with Soft-RoCE; guest log: $work/guest.log"
set +e
timeout "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 -nographic -no-reboot \
    -kernel "$vmlinuz" -initrd "$work/initrd.gz" -append "console=ttyS0 panic=-1 quiet" >"$work/guest.log" 2>&1
status=$?
set -e
verdict=$(grep -a -o 'RDMA-GUEST-RESULT: .*' "$work/guest.log" | tr -d '\r' | tail -1)
grep -a -E '^rdma_smoke|^rdma-guest-test|^link ' "$work/guest.log" | tr -d '\r' || true
echo "${verdict:-RDMA-GUEST-RESULT: fail (no verdict; qemu exit $status, see $work/guest.log)} in $(( $(date +%s) - started )) s"
case "$verdict" in "RDMA-GUEST-RESULT: pass"*) exit 0 ;; *) tail -30 "$work/guest.log"; exit 1 ;; esac
