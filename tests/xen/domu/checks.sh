# The guest-side checks: `sh /lib/xvf/checks.sh CHECK RESULTFILE`.
#
# /init runs each one in its own session under a timeout. A check appends key=value lines
# to RESULTFILE as it learns them (so a check killed halfway still reports how far it got),
# prints free-form diagnostics on stdout, and exits 0 for PASS, anything else for FAIL.
#
# Parameters (kernel command line, xvf. prefix; defaults in brackets):
#   checks=blk,i2c,gpio,fs  which checks, in order [none]   timeout=S per check [30]
#   CHECK.timeout=S  for one check            console_loglevel=N during checks [4]
#   poweroff=0       a shell instead of powering off at the end (debugging)
#   blk.dev [vda]  blk.sector [2048]  blk.bytes [65536, a multiple of 512]  blk.seed [xvf]
#   blk.ref.sector [0]  blk.ref.bytes [4096]  blk.ref.sha256 (checked only when given)
#   i2c.addr [0x68]  i2c.chip [ds1307]  i2c.set=YYYY-MM-DDTHH:MM:SS (UTC; write, read back)
#   gpio.line [0] (offset in the virtio chip)
#   fs.tag [xvf]  fs.read=NAME  fs.read.sha256  fs.write=NAME  fs.write.seed [xvf]
#   fs.write.bytes [4096]
# Written data is `pattern SEED BYTES` (lib.sh), which the Dom0 side recomputes.

# `A && B || fail` is meant: fail exits, and it runs exactly when A or B fails.
# shellcheck disable=SC2015
# shellcheck source=lib.sh
. /lib/xvf/lib.sh
load_params >/dev/null

CHECK=$1
RESULT=$2

kv() {
	echo "$1=$(squash "$2")" >>"$RESULT"
}

fail() {
	kv reason "$1"
	exit 1
}

# wait_for PATH SECONDS: poll until PATH exists (device nodes appear asynchronously).
wait_for() {
	_n=$(($2 * 10))
	while [ ! -e "$1" ]; do
		[ "$_n" -le 0 ] && return 1
		_n=$((_n - 1))
		sleep 0.1
	done
}

# The first virtio device (virtioN) whose device id is $1 (decimal), or nothing.
virtio_with_id() {
	for _d in /sys/bus/virtio/devices/virtio*; do
		[ -e "$_d/device" ] || continue
		if [ $(($(cat "$_d/device"))) -eq "$1" ]; then
			basename "$_d"
			return 0
		fi
	done
	return 1
}

drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# dd_io WHAT ARGS...: run dd with O_DIRECT first, and without it if the device refuses
# (then the page cache is flushed and dropped around the transfer instead). Sets IO.
dd_io() {
	_what=$1
	shift
	_flag=oflag
	[ "$_what" = read ] && _flag=iflag
	if dd "$@" "$_flag=direct" 2>/tmp/dd.err; then
		IO=direct
		return 0
	fi
	echo "dd $_what with O_DIRECT failed: $(cat /tmp/dd.err)"
	drop_caches
	if dd "$@" 2>/tmp/dd.err; then
		drop_caches
		IO=buffered
		return 0
	fi
	echo "dd $_what failed: $(cat /tmp/dd.err)"
	return 1
}

check_blk() {
	dev=$(param blk.dev vda)
	sector=$(param blk.sector 2048)
	bytes=$(param blk.bytes 65536)
	seed=$(param blk.seed xvf)
	kv dev "$dev"
	wait_for "/dev/$dev" 5 || fail no_device
	size=$(cat "/sys/block/$dev/size")
	kv size_sectors "$size"
	[ "$bytes" -gt 0 ] && [ $((bytes % 512)) -eq 0 ] || fail bytes_not_sector_multiple
	[ $((sector + bytes / 512)) -le "$size" ] || fail write_beyond_disk
	# One request per 64 KiB (multi-page, so several grants per request) where it divides.
	bs=512
	[ $((bytes % 4096)) -eq 0 ] && bs=4096
	[ $((bytes % 65536)) -eq 0 ] && bs=65536
	count=$((bytes / bs))
	off=$((sector * 512))
	pattern "$seed" "$bytes" >/tmp/blk.w
	kv write_sector "$sector"
	kv write_bytes "$bytes"
	kv write_sha256 "$(sha256 /tmp/blk.w)"
	dd_io write if=/tmp/blk.w of="/dev/$dev" bs=$bs count=$count seek=$off \
		oflag=seek_bytes conv=notrunc,fsync || fail write_error
	kv write_io "$IO"
	drop_caches
	dd_io read if="/dev/$dev" of=/tmp/blk.r bs=$bs count=$count skip=$off \
		iflag=skip_bytes || fail read_error
	kv read_io "$IO"
	kv read_sha256 "$(sha256 /tmp/blk.r)"
	if cmp -s /tmp/blk.w /tmp/blk.r; then kv match 1; else kv match 0; fi
	ok=1
	cmp -s /tmp/blk.w /tmp/blk.r || ok=0

	# A region Dom0 wrote into the image before the guest started.
	ref_sha=$(param blk.ref.sha256 '')
	if [ -n "$ref_sha" ]; then
		ref_sector=$(param blk.ref.sector 0)
		ref_bytes=$(param blk.ref.bytes 4096)
		kv ref_sector "$ref_sector"
		kv ref_bytes "$ref_bytes"
		rbs=512
		[ $((ref_bytes % 4096)) -eq 0 ] && rbs=4096
		dd_io read if="/dev/$dev" of=/tmp/blk.ref bs=$rbs count=$((ref_bytes / rbs)) \
			skip=$((ref_sector * 512)) iflag=skip_bytes || fail ref_read_error
		got=$(sha256 /tmp/blk.ref)
		kv ref_sha256 "$got"
		if [ "$got" = "$ref_sha" ]; then kv ref_match 1; else kv ref_match 0; ok=0; fi
	fi
	[ "$ok" = 1 ] || fail data_mismatch
}

check_i2c() {
	addr=$(param i2c.addr 0x68)
	chip=$(param i2c.chip ds1307)
	vdev=$(virtio_with_id 34) || fail no_virtio_i2c_device
	kv virtio "$vdev"
	adapter=
	for _a in /sys/bus/virtio/devices/"$vdev"/i2c-*; do
		[ -e "$_a" ] && adapter=$(basename "$_a") && break
	done
	[ -n "$adapter" ] || fail no_adapter
	bus=${adapter#i2c-}
	kv adapter "$adapter"
	kv adapter_name "$(cat "/sys/bus/i2c/devices/$adapter/name")"

	# The raw time registers first, through i2c-dev (before the RTC driver owns the address).
	if wait_for "/dev/$adapter" 5; then
		raw=$(i2ctransfer -y "$bus" "w1@$addr" 0x00 r8 2>&1)
		rc=$?
		kv raw_rc "$rc"
		[ "$rc" = 0 ] && kv raw_regs "$(echo "$raw" | tr -s ' ' ',')"
		echo "raw register read: $raw"
	else
		kv raw_rc no_i2c_dev
	fi

	echo "$chip $addr" >"/sys/bus/i2c/devices/$adapter/new_device" || fail new_device_refused
	client=/sys/bus/i2c/devices/$bus-$(printf %04x $((addr)))
	wait_for "$client" 5 || fail no_client
	_n=50
	rtc=
	while [ -z "$rtc" ] && [ "$_n" -gt 0 ]; do
		for _r in "$client"/rtc/rtc*; do
			[ -e "$_r" ] && rtc=$(basename "$_r")
		done
		[ -n "$rtc" ] || { sleep 0.1; _n=$((_n - 1)); }
	done
	[ -n "$rtc" ] || fail rtc_not_registered
	kv rtc "$rtc"
	wait_for "/dev/$rtc" 5 || fail no_rtc_node

	set_to=$(param i2c.set '')
	if [ -n "$set_to" ]; then
		# xvf.i2c.set=YYYY-MM-DDTHH:MM:SS (UTC): write it to the chip through the driver.
		date -u -s "$(echo "$set_to" | tr T ' ')" >/dev/null || fail bad_set_time
		hwclock -w -u -f "/dev/$rtc" || fail hwclock_write_error
		kv set "$set_to"
	fi
	out=$(hwclock -r -u -f "/dev/$rtc" 2>&1) || {
		echo "hwclock: $out"
		fail hwclock_read_error
	}
	kv hwclock "$out"
	kv rtc_time "$(cat "/sys/class/rtc/$rtc/date")T$(cat "/sys/class/rtc/$rtc/time")"
	kv rtc_epoch "$(cat "/sys/class/rtc/$rtc/since_epoch")"
	if [ -n "$set_to" ]; then
		# The clock runs on: the minute written must read back (allow the minute rolling over).
		want=$(date -u -d "$(echo "$set_to" | tr T ' ')" +%s)
		got=$(cat "/sys/class/rtc/$rtc/since_epoch")
		diff=$((got - want))
		kv set_drift_s "$diff"
		[ "$diff" -ge 0 ] && [ "$diff" -le 60 ] || fail set_time_not_read_back
	fi
}

check_gpio() {
	line=$(param gpio.line 0)
	vdev=$(virtio_with_id 41) || fail no_virtio_gpio_device
	kv virtio "$vdev"
	chipdir=
	for _c in /sys/class/gpio/gpiochip*; do
		[ -e "$_c/label" ] || continue
		# gpio-virtio labels its chip with the virtio device's name.
		[ "$(cat "$_c/label")" = "$vdev" ] && chipdir=$_c && break
	done
	[ -n "$chipdir" ] || fail no_gpiochip
	base=$(cat "$chipdir/base")
	ngpio=$(cat "$chipdir/ngpio")
	kv chip "$(basename "$chipdir")"
	kv base "$base"
	kv ngpio "$ngpio"
	kv line "$line"
	[ "$line" -lt "$ngpio" ] || fail line_out_of_range
	gpio=$((base + line))
	echo "$gpio" >/sys/class/gpio/export || fail export_refused
	# The exported line is /sys/class/gpio/gpioNNN, or the line's name when the device gave
	# names (GET_LINE_NAMES); its real path runs through our virtio device.
	d=
	_n=50
	while [ -z "$d" ] && [ "$_n" -gt 0 ]; do
		for _v in /sys/class/gpio/*/value; do
			[ -e "$_v" ] || continue
			case $(readlink -f "${_v%/value}") in
			*/"$vdev"/*) d=${_v%/value} ;;
			esac
		done
		[ -n "$d" ] || { sleep 0.1; _n=$((_n - 1)); }
	done
	if [ -z "$d" ]; then
		echo "no line directory after export; /sys/class/gpio has: $(ls /sys/class/gpio)"
		fail export_no_node
	fi
	kv line_dir "$(basename "$d")"
	# Before anything set it, the line may have no value (vhost-device-gpio's mock answers
	# ERR): report what was seen, it is not a failure.
	kv initial_direction "$(cat "$d/direction" 2>/dev/null || echo ERR)"
	kv initial_value "$(cat "$d/value" 2>/dev/null || echo ERR)"
	echo out >"$d/direction" || fail set_output_refused
	echo 1 >"$d/value" || fail write1_refused
	v1=$(cat "$d/value" 2>/dev/null || echo ERR)
	echo 0 >"$d/value" || fail write0_refused
	v0=$(cat "$d/value" 2>/dev/null || echo ERR)
	kv wrote 1,0
	kv read "$v1,$v0"
	echo in >"$d/direction" || fail set_input_refused
	kv input_value "$(cat "$d/value" 2>/dev/null || echo ERR)"
	echo "$gpio" >/sys/class/gpio/unexport
	[ "$v1" = 1 ] && [ "$v0" = 0 ] || fail readback_mismatch
}

check_fs() {
	tag=$(param fs.tag xvf)
	rname=$(param fs.read '')
	rsha=$(param fs.read.sha256 '')
	wname=$(param fs.write '')
	wseed=$(param fs.write.seed xvf)
	wbytes=$(param fs.write.bytes 4096)
	kv tag "$tag"
	mkdir -p /mnt/fs
	mount -t virtiofs "$tag" /mnt/fs || fail mount_failed
	kv entries "$(find /mnt/fs -mindepth 1 -maxdepth 1 | wc -l)"
	ok=1
	if [ -n "$rname" ]; then
		kv read "$rname"
		if [ -f "/mnt/fs/$rname" ]; then
			kv read_bytes "$(wc -c <"/mnt/fs/$rname")"
			got=$(sha256 "/mnt/fs/$rname")
			kv read_sha256 "$got"
			if [ -z "$rsha" ] || [ "$got" = "$rsha" ]; then kv read_match 1; else
				kv read_match 0
				ok=0
			fi
		else
			kv read_bytes missing
			ok=0
		fi
	fi
	if [ -n "$wname" ]; then
		pattern "$wseed" "$wbytes" >/tmp/fs.w
		kv write "$wname"
		kv write_bytes "$wbytes"
		kv write_sha256 "$(sha256 /tmp/fs.w)"
		cp /tmp/fs.w "/mnt/fs/$wname" || fail write_error
		sync
		# Read it back from the daemon, not from this guest's page cache.
		drop_caches
		got=$(sha256 "/mnt/fs/$wname")
		kv readback_sha256 "$got"
		[ "$got" = "$(sha256 /tmp/fs.w)" ] || ok=0
	fi
	umount /mnt/fs || fail umount_failed
	kv umount 1
	[ "$ok" = 1 ] || fail data_mismatch
}

# Never finishes: shows that /init's timeout ends a stuck check (and everything it started).
check_hang() {
	kv started 1
	sleep 3600 &
	wait
}

case $CHECK in
blk | i2c | gpio | fs | hang) "check_$CHECK" ;;
*) fail unknown_check ;;
esac
