# Shared by /init and /lib/xvf/checks.sh in the DomU initramfs (busybox sh, POSIX).
#
# The test plan comes from the kernel command line: every word `xvf.KEY=VALUE` becomes
# the shell variable P_KEY (dots turned into underscores), read with `param KEY DEFAULT`.
# Values are restricted to a safe character set, so nothing from the command line is
# ever evaluated as shell code.

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

load_params() {
	# shellcheck disable=SC2013 # the command line is one line of words
	for _w in $(cat /proc/cmdline); do
		case $_w in
		xvf.*=*) ;;
		*) continue ;;
		esac
		_k=${_w%%=*}
		_k=${_k#xvf.}
		_v=${_w#*=}
		case $_k in
		'' | *[!a-z0-9._]*)
			echo "XVF-LOG: init: ignoring parameter with a bad name: $_w"
			continue
			;;
		esac
		case $_v in
		*[!A-Za-z0-9._:,/+@-]*)
			echo "XVF-LOG: init: ignoring parameter with unsafe characters: $_w"
			continue
			;;
		esac
		_k=$(echo "$_k" | tr . _)
		eval "P_$_k=\$_v"
	done
}

# param KEY DEFAULT: the value of xvf.KEY, or DEFAULT when it is absent or empty.
param() {
	_k=$(echo "$1" | tr . _)
	eval "_v=\${P_$_k-}"
	if [ -n "$_v" ]; then echo "$_v"; else echo "$2"; fi
}

# The deterministic data pattern the Dom0 side recomputes (tests/xen/rig/domu.py pattern()):
# 64-byte lines "xvf:SEED:NNNNNNNN:" (line number, 8 decimal digits) padded with '.' to 63
# characters plus a newline, cut to NBYTES. Every line names its own position, so a block
# landing at the wrong offset or coming from an older run (another seed) never compares equal.
pattern() {
	awk -v s="$1" -v n="$2" 'BEGIN {
		dots = "..............................................................."
		lines = int((n + 63) / 64)
		for (i = 0; i < lines; i++)
			printf "%s\n", substr(sprintf("xvf:%s:%08d:", s, i) dots, 1, 63)
	}' | head -c "$2"
}

sha256() {
	sha256sum "$1" | cut -d' ' -f1
}

# Values in result lines never hold whitespace: runs of it become one '_'.
squash() {
	echo "$*" | tr -s ' \t\n' '___' | sed 's/^_//; s/_$//'
}
