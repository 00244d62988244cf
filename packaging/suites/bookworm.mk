# Debian 12 (bookworm), oldstable. Read by debian/rules (make) and by build-deb.sh (KC_* lines).
# python3 is 3.11; Debian's python3-pydantic is 1.10 and it has no pydantic-settings: both are
# vendored (packaging/vendor/), with pydantic-core's compiled cp311 extension, so the package
# is amd64 and tied to python3 3.11. Its version sorts below the trixie build's (~deb12), so
# that an upgrade to Debian 13 replaces it. systemd's files in /lib, as bookworm ships them.
KC_ARCH := amd64
KC_VENDOR := yes
KC_VERSION_SUFFIX := ~deb12
KC_PYTHON_DEPENDS := python3 (<< 3.12)
KC_SYSTEMD := /lib/systemd
