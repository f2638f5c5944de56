#!/usr/bin/env bash
# Runs commands inside a throw-away QEMU guest (TCG) whose Debian kernel has
# Soft-RoCE: rdma_rxe is loaded, an rxe device is bound to the guest's
# loopback, and then the command runs. Its output and exit status come back
# to the host over the serial console. For hosts whose kernel has no RDMA.
#
#   soft-roce-setup/guest-run.sh [--timeout SECS] [--bin PATH]... -- 'shell command'
#
# --bin copies an executable (and the libraries ldd lists for it) into the
# guest's /bin. Inside, the device is `rxe0` on `lo`; use GID index 1
# (::ffff:127.0.0.1). Exit status: the command's, or 125 if the guest
# never reported one (boot failure, timeout, crash).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${PAGEWIRE_GUEST_CACHE:-$here/../target/soft-roce}
timeout=600
bins=()
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) timeout=$2; shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "guest-run: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ $# -ge 1 ] || { echo "guest-run: no command given" >&2; exit 2; }
command=$1

need() { command -v "$1" >/dev/null || { echo "guest-run: $1 is missing; run soft-roce-setup/install-deps.sh" >&2; exit 2; }; }
for t in qemu-system-x86_64 busybox cpio depmod modprobe apt-get dpkg-deb rdma ibv_devinfo; do need "$t"; done

# 1. The kernel: the package linux-image-amd64 depends on (the -cloud
#    flavour has no rdma_rxe). Extracted, never installed on the host.
mkdir -p "$cache"
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
kpkg=$(kernel_pkg)
if [ -z "$kpkg" ] && [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && kpkg=$(kernel_pkg)
fi
[ -n "$kpkg" ] || { echo "guest-run: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 2; }
kver=${kpkg#linux-image-}
kroot=$cache/$kpkg
if [ ! -f "$kroot/boot/vmlinuz-$kver" ]; then
    echo "guest-run: fetching $kpkg" >&2
    rm -rf "$kroot" && mkdir -p "$kroot"
    (cd "$cache" && rm -f "$kpkg"_*.deb && apt-get download "$kpkg" >/dev/null 2>&1)
    dpkg-deb -x "$cache/$kpkg"_*.deb "$kroot"
    depmod -b "$kroot" "$kver"
fi

# 2. The initramfs.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,etc/libibverbs.d,usr/lib/x86_64-linux-gnu/libibverbs}
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in sh mount insmod ip poweroff cat echo sleep mkdir ls dmesg grep sed timeout kill ps true false seq wc head tail env date cut; do
    ln -sf busybox "$root/bin/$applet"
done
add_bin() {
    cp "$1" "$root/bin/"
    { ldd "$1" 2>/dev/null || true; } | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -nL "$lib" "$root$lib"
    done
}
for b in "$(command -v rdma)" "$(command -v ibv_devinfo)" "${bins[@]}"; do add_bin "$b"; done
provider=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | head -n1)
cp -L "$provider" "$root/usr/lib/x86_64-linux-gnu/libibverbs/"
add_bin "$provider" && rm -f "$root/bin/$(basename "$provider")"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
# Modules in dependency order, as modprobe resolves them for this kernel.
for m in crc32_generic rdma_rxe; do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m"
done | awk '$1=="insmod" && !seen[$2]++ {print $2}' > "$work/modules"
: > "$root/modules"
while read -r m; do
    cp "$m" "$root/lib/modules/"
    echo "/lib/modules/$(basename "$m")" >> "$root/modules"
done < "$work/modules"
printf '%s\n' "$command" > "$root/command"
cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
export PATH=/bin LD_LIBRARY_PATH=/lib:/usr/lib/x86_64-linux-gnu
while read -r m; do insmod "$m" || echo "guest: insmod $m failed"; done < /modules
ip link set lo up
rdma link add rxe0 type rxe netdev lo || { dmesg | tail -n 20; }
echo "=== guest ready ==="
sh -c "$(cat /command)"
echo "PAGEWIRE-GUEST-EXIT=$?"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$work/initrd"

# 3. Boot. TCG: KVM cannot boot a stock kernel on this kind of host.
log=$work/console
set +e
timeout --foreground "$timeout" qemu-system-x86_64 -accel tcg -m 2048 -smp 2 \
    -nographic -no-reboot -nic none \
    -kernel "$kroot/boot/vmlinuz-$kver" -initrd "$work/initrd" \
    -append 'console=ttyS0 panic=-1 quiet' < /dev/null | tee "$log"
set -e
rc=$(sed -n 's/.*PAGEWIRE-GUEST-EXIT=\([0-9]*\).*/\1/p' "$log" | tail -n1)
if [ -z "$rc" ]; then
    echo "guest-run: the guest did not report an exit status (boot failure or timeout after ${timeout}s)" >&2
    exit 125
fi
exit "$rc"
