#!/usr/bin/env bash
# `make deb [SUITE="trixie bookworm"]`: build out/deb/<suite>/killcord_<version>_<arch>.deb from
# this checkout, for each suite named (default: Debian 13 trixie and Debian 12 bookworm).
#
# 1. checks that every file the package installs exists and that debian/changelog's
#    version is killcord.__version__,
# 2. per suite, assembles a build tree under out/build/<suite>/ (never builds in the
#    repository) with debian/suite.mk = packaging/suites/<suite>.mk; for Debian 12 it
#    vendors the wheels that suite lacks (packaging/vendor/requirements.txt) with this
#    machine's pip, `pip install --target` for CPython 3.11 on x86_64,
# 3. runs dpkg-buildpackage -us -uc -b and that suite's lintian inside a chroot of the suite
#    (packaging/suite_chroot.py: mmdebstrap, mirror from this machine's apt sources, tarball
#    cached under .cache/chroot/), clean at warning level.
# Root: mmdebstrap and the chroot need it. Network: the first build of a chroot, and pip.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "make deb: $*"; }
die() { echo "make deb: ERROR: $*" >&2; exit 1; }

suites=("$@")
((${#suites[@]})) || suites=(trixie bookworm)
for suite in "${suites[@]}"; do
	known=(packaging/suites/*.mk)
	known=("${known[@]#packaging/suites/}")
	[ -f "packaging/suites/$suite.mk" ] || die "unknown suite '$suite': use one or more of ${known[*]%.mk} (make deb SUITE=trixie)"
done
[ "$(id -u)" = 0 ] || die "run as root: each package is built in a chroot of its suite (mmdebstrap --mode=root, unshare)"

# ---- build tools on this machine (Debian 12): the chroots bring the rest ----
missing=()
for p in mmdebstrap python3-pip; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	say "installing ${missing[*]}"
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 1. what goes in: every file must exist, the versions must agree ----
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' src/killcord/__init__.py)
[ -n "$version" ] || die "no __version__ = \"...\" line in src/killcord/__init__.py"
changelog_version=$(sed -n '1s/^killcord (\([^)]*\)).*/\1/p' packaging/debian/changelog)
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
	packaging/vendor/requirements.txt
	packaging/vendor/copyright
	packaging/vendor/lintian-overrides
	memlockd/README.md
	README.md
)
absent=()
for f in "${required[@]}"; do [ -f "$f" ] || absent+=("$f"); done
((${#absent[@]} == 0)) || die "the package needs these files, which do not exist: ${absent[*]}"

# KC_NAME from a suite's .mk file ("KC_NAME := value")
suite_var() { sed -n "s/^$2 := *//p" "packaging/suites/$1.mk"; }

# ---- 2. the build tree of one suite ----
assemble() { # $1: suite, $2: tree
	local suite=$1 tree=$2 arch suffix
	arch=$(suite_var "$suite" KC_ARCH)
	suffix=$(suite_var "$suite" KC_VERSION_SUFFIX)
	mkdir -p "$tree/src" "$tree/packaging"
	cp -r packaging/debian "$tree/debian"
	cp "packaging/suites/$suite.mk" "$tree/debian/suite.mk"
	cp -r src/killcord "$tree/src/killcord"
	find "$tree/src" -name __pycache__ -prune -exec rm -rf {} +
	cp -r systemd initramfs-hooks memlockd README.md "$tree/"
	cp packaging/killcord.toml packaging/killcord-launcher "$tree/packaging/"
	# the one field a substvar cannot carry
	sed -i "s/^Architecture: all$/Architecture: $arch/" "$tree/debian/control"
	grep -qx "Architecture: $arch" "$tree/debian/control" || die "debian/control has no 'Architecture: all' line to set"
	if [ -n "$suffix" ]; then  # this suite's own version, sorting below the plain one
		# dated one second after the entry it rebuilds: newer, as lintian requires, and the
		# same on every build (reproducible)
		local date
		date=$(sed -n 's/^ -- .*>  //p' packaging/debian/changelog | head -1)
		date=$(LC_ALL=C date -u -R -d "@$(($(date -u -d "$date" +%s) + 1))")
		{
			echo "killcord ($version$suffix) $suite; urgency=medium"
			echo
			echo "  * Built for $suite (packaging/suites/$suite.mk)."
			echo
			echo " -- $(sed -n 's/^Maintainer: //p' packaging/debian/control)  $date"
			echo
			cat packaging/debian/changelog
		} > "$tree/debian/changelog"
	fi
	# lintian overrides differ per suite (a tag one lintian knows, another may not)
	if [ -f "packaging/suites/$suite.lintian-overrides" ]; then
		cp "packaging/suites/$suite.lintian-overrides" "$tree/debian/killcord.lintian-overrides"
	fi
	if [ "$(suite_var "$suite" KC_VENDOR)" = yes ]; then
		{ echo; grep -v '^#' packaging/vendor/copyright; } >> "$tree/debian/copyright"
		{ echo; cat packaging/vendor/lintian-overrides; } >> "$tree/debian/killcord.lintian-overrides"
		vendor "$tree/vendor"
	fi
}

# The wheels Debian 12 lacks, for its CPython 3.11 on x86_64, with this machine's pip (and so
# its index configuration): the only network step besides the chroots' packages.
vendor() { # $1: target directory
	local pip=(python3 -m pip)
	"${pip[@]}" --version >/dev/null 2>&1 || pip=(/usr/bin/python3 -m pip)
	say "vendoring $(grep -c '^[a-z]' packaging/vendor/requirements.txt) wheels with ${pip[*]}"
	"${pip[@]}" install --quiet --root-user-action=ignore --target "$1" --no-deps --no-compile --only-binary=:all: \
		--implementation cp --python-version 3.11 --abi cp311 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-r packaging/vendor/requirements.txt
	rm -rf "${1:?}/bin"  # console scripts (dotenv): not shipped
}

# ---- 3. build and lint in the suite's chroot ----
# Runs in the chroot, in /work = out/build/<suite>. The vendored wheels must import with the
# suite's own interpreter, together, as the launcher will use them.
chroot_script() { # $1: tree name, $2: vendor yes|no
	cat <<EOF
cd /work/$1
if [ "$2" = yes ]; then
	python3 -I -c "
import os, sys; sys.path[0:0] = [os.path.abspath('vendor')]
import pydantic, pydantic_core, pydantic_settings, annotated_types, typing_extensions, typing_inspection, dotenv
assert pydantic.__file__.startswith(os.path.abspath('vendor') + '/'), pydantic.__file__
print('make deb: vendored pydantic', pydantic.VERSION, 'pydantic-core', pydantic_core.__version__,
      'pydantic-settings', pydantic_settings.__version__, 'import with', sys.version.split()[0])
"
fi
echo "make deb: dpkg-buildpackage in \$(pwd), \$(. /etc/os-release && echo "\$PRETTY_NAME"), python3 \$(python3 -c 'import sys; print(sys.version.split()[0])')"
if ! dpkg-buildpackage -us -uc -b > ../dpkg-buildpackage.log 2>&1; then
	tail -40 ../dpkg-buildpackage.log >&2
	echo "make deb: ERROR: dpkg-buildpackage failed; full log: out/build/\$(basename /work)/dpkg-buildpackage.log" >&2
	exit 1
fi
cd ..
echo "make deb: lintian \$(dpkg-query -W -f='\${Version}' lintian) (tags overridden in packaging/suites/<suite>.lintian-overrides and packaging/vendor/lintian-overrides are not shown)"
lintian --info --display-info --fail-on error,warning killcord_*.deb > lintian.txt 2>&1 || { cat lintian.txt >&2; exit 1; }
cat lintian.txt
EOF
}

rm -f out/deb/killcord_*.deb  # the layout before there was one package per suite
for suite in "${suites[@]}"; do
	start=$SECONDS
	work=$ROOT/out/build/$suite
	rm -rf "$work"
	mkdir -p "$work"
	tree_name=killcord-$version
	assemble "$suite" "$work/$tree_name"
	tarball=$(python3 packaging/suite_chroot.py tarball "$suite" build) || die "no $suite chroot (see above)"
	say "$suite: building in a chroot from $(basename "$tarball")"
	python3 packaging/suite_chroot.py run "$tarball" "$work" \
		"$(chroot_script "$tree_name" "$(suite_var "$suite" KC_VENDOR)")" \
		|| die "$suite: the build or lintian failed (out/build/$suite/dpkg-buildpackage.log, out/build/$suite/lintian.txt)"
	debs=("$work"/killcord_*.deb)
	if ((${#debs[@]} != 1)) || [ ! -f "${debs[0]}" ]; then
		die "$suite: expected one killcord_*.deb in $work, found: ${debs[*]}"
	fi
	mkdir -p "out/deb/$suite"
	rm -f "out/deb/$suite"/killcord_*.deb
	mv "${debs[0]}" "out/deb/$suite/"
	say "$suite: built out/deb/$suite/$(basename "${debs[0]}"), lintian clean at warning level (out/build/$suite/lintian.txt), $((SECONDS - start)) s"
done
