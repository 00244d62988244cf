#!/usr/bin/env bash
# Dry-run demo on this machine: a loop device plays the boot stick. killcord arms on it,
# the device is really removed from the kernel, and killcord fires its (dry) sequence.
# Dry-run is the interlock: nothing is killed, nothing is kexec'd. Needs root.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "demo: run as root (loop devices)" >&2; exit 2; }
out=out/demo
mkdir -p "$out"
state=$(mktemp -d /dev/shm/killcord-demo.XXXXXX)   # RAM only, as the audit record must be
chmod 755 "$state"
img="$out/stick.img"
truncate -s 16M "$img"
dev=$(losetup --find --show "$img")
pid=""
cleanup() {
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then wait "$pid" 2>/dev/null || true; fi
  losetup --detach "$dev" 2>/dev/null || true
  rm -rf "$state" "$img"
}
trap cleanup EXIT

cat > "$state/killcord.toml" <<TOML
mode = "dry-run"
medium = "$dev"
state_dir = "$state"
socket = "$state/control.sock"
TOML
export KILLCORD_CONFIG="$state/killcord.toml"

echo "== arming on $dev (dry-run)"
killcord daemon 2>"$out/daemon.log" &
pid=$!
for _ in $(seq 100); do
  killcord status --json 2>/dev/null | grep -q '"state": "armed"' && break
  sleep 0.1
done
killcord status

echo
echo "== pulling the stick: detaching $dev and removing it from the kernel"
losetup --detach "$dev"
python3 - "$dev" <<'PY'
import fcntl, os, sys, time
fd = os.open("/dev/loop-control", os.O_RDWR)
for _ in range(50):
    try:
        fcntl.ioctl(fd, 0x4C81, int(sys.argv[1].removeprefix("/dev/loop")))  # LOOP_CTL_REMOVE
        break
    except OSError:
        time.sleep(0.02)
PY
for _ in $(seq 100); do
  killcord status --json 2>/dev/null | grep -q '"state": "fired"' && break
  sleep 0.05
done
echo
killcord status
killcord status --json > "$out/status.json"
record=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(next((st["detail"].get("record","") for st in s["stages"] if st["name"]=="audit"), ""))' "$out/status.json")
echo
echo "== audit record (RAM only): $record"
[ -n "$record" ] && python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("trigger:", d["trigger"]); print("largest slab caches:", ", ".join(t["name"] for t in d["top"][:5]))' "$record"
grep -q '"state": "fired"' "$out/status.json" || { echo "demo: killcord did not fire" >&2; exit 1; }
echo
echo "demo: fired in dry-run; status in $out/status.json, daemon log in $out/daemon.log"
