#!/bin/sh
# dracut cmdline hook: with killcord.wipe=1 (the kexec target), wipe free memory and end
# the machine before anything else is set up (killcord-wipe-boot never returns while the
# machine runs). Sourced by dracut: no exit on the way out.
# The line is read as the kernel reads it (killcord-cmdline), not with dracut's getarg,
# which splits on spaces and ignores quotes and "--".
# shellcheck source=/dev/null
. /usr/lib/killcord/killcord-cmdline

if [ "$(kc_param killcord.wipe)" = 1 ]; then
	/usr/lib/killcord/killcord-wipe-boot
fi
