# Debian 13 (trixie), stable. Read by debian/rules (make) and by build-deb.sh (KC_* lines).
# python3 is 3.13; Debian has pydantic 2 (2.10) and pydantic-settings (2.8): nothing is
# vendored, nothing compiled, so the package is Architecture: all. systemd's files live in
# /usr/lib (trixie's packages ship nothing in the aliased /lib).
# pydantic-settings >= 2.2: TomlConfigSettingsSource (src/killcord/config.py) first appeared in 2.2.
KC_ARCH := all
KC_VENDOR := no
KC_VERSION_SUFFIX :=
KC_PYTHON_DEPENDS := python3-pydantic (>= 2.5), python3-pydantic-settings (>= 2.2)
KC_SYSTEMD := /usr/lib/systemd
