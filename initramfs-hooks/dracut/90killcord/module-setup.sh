#!/bin/bash
# dracut module: killcord's wipe mode (killcord.wipe=1 on the kexec target) and its
# shutdown hook (when dracut's own shutdown, not killcord-shutdown-prepare, owns
# /run/initramfs).

check() {
	[ -x /usr/lib/killcord/killcord-wipe ] || return 1
	return 0
}

depends() {
	return 0
}

install() {
	inst_multiple dd tr wc mount umount rm rmdir mkdir cat awk sort timeout poweroff reboot halt fallocate dmesg grep
	inst_simple /usr/lib/killcord/killcord-wipe
	inst_simple /usr/lib/killcord/killcord-wipe-boot
	inst_simple /usr/lib/killcord/killcord-cmdline
	# cmdline hooks run first, before udev and before the root is looked for
	# shellcheck disable=SC2154 # moddir: set by dracut for the module being installed
	inst_hook cmdline 00 "$moddir/killcord-wipe-hook.sh"
	inst_hook shutdown 90 "$moddir/killcord-shutdown-hook.sh"
}
