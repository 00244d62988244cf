#!/usr/bin/env bash
# `make deb`: build out/deb/killcord_<version>_amd64.deb from this checkout.
#
# 1. installs the build tools it lacks (Debian 12, as root),
# 2. checks that every file the package installs exists and that debian/changelog's
#    version is killcord.__version__,
# 3. vendors the wheels Debian 12 lacks (packaging/vendor-requirements.txt) with
#    `pip install --target` for CPython 3.11 on x86_64 (the only network step),
# 4. assembles a build tree under out/build/ (never builds in the repository) and runs
#    dpkg-buildpackage -us -uc -b there, then lintian on the result.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=$ROOT/out/build
DEBDIR=$ROOT/out/deb
APT_PACKAGES=(dpkg-dev debhelper lintian python3 python3-pip)
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "make deb: $*"; }
die() { echo "make deb: ERROR: $*" >&2; exit 1; }

# ---- 1. build tools ----
missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	[ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run as root, or apt-get install them"
	say "installing ${missing[*]}"
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 2. what goes in: every file must exist, the versions must agree ----
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' src/killcord/__init__.py)
[ -n "$version" ] || die "no __version__ = \"...\" line in src/killcord/__init__.py"
changelog_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
[ "$changelog_version" = "$version" ] || die "packaging/debian/changelog is at $changelog_version but \
src/killcord/__init__.py says $version: add a changelog entry (dch -c packaging/debian/changelog -v $version)"

required=(
	initramfs-hooks/initramfs-tools/hooks/killcord
	initramfs-hooks/initramfs-tools/scripts/init-top/killcord
	initramfs-hooks/dracut/90killcord/module-setup.sh
	initramfs-hooks/killcord-wipe
	initramfs-hooks/killcord-cmdline
	initramfs-hooks/killcord-shutdown
	initramfs-hooks/prepare-shutdown
	systemd/killcord.service
	systemd/killcord-shutdown-prepare.service
	systemd/killcord.sleep
	systemd/killcord.shutdown
	packaging/killcord.toml
	packaging/killcord-launcher
	memlockd/README.md
	README.md
)
absent=()
for f in "${required[@]}"; do [ -f "$f" ] || absent+=("$f"); done
((${#absent[@]} == 0)) || die "the package needs these files, which do not exist: ${absent[*]}"

# ---- 3. vendored wheels (CPython 3.11, x86_64: Debian 12's python3 is 3.11) ----
PIP=(python3 -m pip)
if ! "${PIP[@]}" --version >/dev/null 2>&1; then
	PIP=(/usr/bin/python3 -m pip)  # Debian's python3-pip (installed above)
fi
rm -rf "$BUILD"
mkdir -p "$BUILD" "$DEBDIR"
vendor=$BUILD/vendor
say "vendoring $(grep -c '^[a-z]' packaging/vendor-requirements.txt) wheels with ${PIP[*]}"
"${PIP[@]}" install --quiet --root-user-action=ignore --target "$vendor" --no-deps --no-compile --only-binary=:all: \
	--implementation cp --python-version 3.11 --abi cp311 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	-r packaging/vendor-requirements.txt
rm -rf "${vendor:?}/bin"  # console scripts (dotenv): not shipped
# They must import with Debian's interpreter as the launcher will use them, together.
/usr/bin/python3 -I -c "
import sys; sys.path[0:0] = ['$vendor']
import pydantic, pydantic_core, pydantic_settings, annotated_types, typing_extensions, typing_inspection, dotenv
assert pydantic.__file__.startswith('$vendor'), pydantic.__file__
print('make deb: vendored pydantic', pydantic.VERSION, 'pydantic-core', pydantic_core.__version__,
      'pydantic-settings', pydantic_settings.__version__)
"

# ---- 4. the build tree, then dpkg-buildpackage ----
tree=$BUILD/killcord-$version
mkdir -p "$tree/src" "$tree/packaging"
cp -r packaging/debian "$tree/debian"
cp -r src/killcord "$tree/src/killcord"
find "$tree/src" -name __pycache__ -prune -exec rm -rf {} +
cp -r systemd initramfs-hooks memlockd README.md "$tree/"
cp packaging/killcord.toml packaging/killcord-launcher "$tree/packaging/"
mv "$vendor" "$tree/vendor"

say "dpkg-buildpackage in $tree"
(cd "$tree" && dpkg-buildpackage -us -uc -b) > "$BUILD/dpkg-buildpackage.log" 2>&1 \
	|| { tail -40 "$BUILD/dpkg-buildpackage.log" >&2; die "dpkg-buildpackage failed; full log: $BUILD/dpkg-buildpackage.log"; }

deb=killcord_${version}_amd64.deb
[ -f "$BUILD/$deb" ] || die "dpkg-buildpackage did not produce $deb"
rm -f "$DEBDIR"/killcord_*.deb
mv "$BUILD/$deb" "$DEBDIR/$deb"
say "built out/deb/$deb"

say "lintian (tags overridden in packaging/debian/killcord.lintian-overrides are not shown)"
lintian --info --display-info --fail-on error,warning "$DEBDIR/$deb" | tee "$BUILD/lintian.txt"
say "lintian clean at warning level; report in out/build/lintian.txt"
