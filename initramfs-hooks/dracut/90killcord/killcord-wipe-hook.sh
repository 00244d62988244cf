#!/bin/sh
# dracut cmdline hook: with killcord.wipe=1 (the kexec target), wipe free memory and end
# the machine before anything else is set up. Sourced by dracut: no exit on the way out.
# The line is read as the kernel reads it (killcord-cmdline), not with dracut's getarg,
# which splits on spaces and ignores quotes and "--".
# shellcheck source=/dev/null
. /usr/lib/killcord/killcord-cmdline

if [ "$(kc_param killcord.wipe)" = 1 ]; then
	killcord_then=$(kc_param killcord.wipe_then)
	case "$killcord_then" in poweroff|reboot|halt) ;; *) killcord_then=poweroff ;; esac
	/usr/lib/killcord/killcord-wipe
	echo "<2>killcord: wipe finished (exit $?), ${killcord_then} now" > /dev/kmsg
	"$killcord_then" -f
	case "$killcord_then" in reboot) echo b ;; *) echo o ;; esac > /proc/sysrq-trigger
fi
