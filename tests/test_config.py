"""Configuration: every bad value is refused at start, naming the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from killcord import locate
from killcord.config import DEFAULT_DEADLINES_MS, ConfigError, load
from killcord.events import Stage


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("KILLCORD_"):
            monkeypatch.delenv(k)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "killcord.toml"
    p.write_text(text)
    return p


def test_defaults_are_dry_run(tmp_path: Path) -> None:
    c = load(write(tmp_path, ""))
    assert c.mode == "dry-run" and not c.live
    assert c.medium == "auto"
    assert c.socket == Path("/run/killcord/control.sock")
    assert c.state_dir == Path("/run/killcord")
    assert c.deadlines == DEFAULT_DEADLINES_MS


def test_live_only_when_set_explicitly(tmp_path: Path) -> None:
    assert load(write(tmp_path, 'mode = "live"\n')).live


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, 'medium = "/dev/sda"\nmode = "live"\n')
    monkeypatch.setenv("KILLCORD_MEDIUM", "/dev/loop3")
    monkeypatch.setenv("KILLCORD_MODE", "dry-run")
    c = load(p)
    assert c.medium == "/dev/loop3" and c.mode == "dry-run"


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILLCORD_CONFIG", str(write(tmp_path, 'medium = "uuid:1234-ABCD"\n')))
    assert load().medium == "uuid:1234-ABCD"


def test_partial_deadlines_merge_with_defaults(tmp_path: Path) -> None:
    c = load(write(tmp_path, "[stage_deadlines_ms]\nkill = 250\n"))
    assert c.deadlines[Stage.KILL] == 250
    assert c.deadlines[Stage.SYSRQ] == DEFAULT_DEADLINES_MS[Stage.SYSRQ]


@pytest.mark.parametrize(("text", "names"), [
    ('mode = "armed"\n', ["mode", "'armed'", "dry-run", "live"]),
    ('medium = "sda"\n', ["medium", "'sda'", "/dev/", "serial:"]),
    ('medium = "serial:"\n', ["medium", "serial:<serial>"]),
    ('socket = "run/control.sock"\n', ["socket", "absolute"]),
    ('state_dir = "tmp"\n', ["state_dir", "absolute"]),
    ('kexec_kernel = "vmlinuz"\n', ["kexec_kernel", "'vmlinuz'", "auto"]),
    ('kexec_append = "quiet mem=4G"\n', ["kexec_append", "'mem=4G'", "init_on_free=1"]),
    ('kexec_append = "init_on_free=0"\n', ["kexec_append", "init_on_free=0"]),
    ('kexec_append = "a -- b"\n', ["kexec_append", "'--'"]),
    # read as the kernel reads it (issue 9, part 3): each of these took effect before
    ("kexec_append = '\"mem=4G\"'\n", ["kexec_append", "mem=4G", "keeps memory from being wiped"]),
    ('kexec_append = "reserve-mem=64M:4096:trace"\n', ["kexec_append", "reserve-mem=64M", "keeps memory"]),
    ('kexec_append = "efi-fake-mem=1G@4G:0x40000"\n', ["kexec_append", "efi-fake-mem"]),
    ('kexec_append = "init-on-free=0"\n', ["kexec_append", "init-on-free=0", "killcord sets it itself"]),
    ("kexec_append = 'x=\"crashkernel=256M\"'\n", ["kexec_append", "crashkernel=", "anywhere"]),
    ("kexec_append = 'a \"--\" b'\n", ["kexec_append", "'--'", "goes to init"]),
    ("kexec_append = 'dyndbg=\"file x.c'\n", ["kexec_append", "never closed", "close the quote"]),
    ('kexec_append = "rdinit=/bin/sh"\n', ["kexec_append", "rdinit", "initramfs"]),
    ('panic_group = "no-such-group-xyz"\n', ["panic_group", "no-such-group-xyz", "does not exist"]),
    ('cord = "046d:c52b"\n', ["cord", "046d:c52b", "VID:PID"]),
    ("[stage_deadlines_ms]\nkil = 100\n", ["stage_deadlines_ms", "'kil'", "kill, keys, audit, kexec, poweroff, sysrq"]),
    ("[stage_deadlines_ms]\nkill = 0\n", ["stage_deadlines_ms", "kill = 0", "1 to 120000"]),
    ('[stage_deadlines_ms]\nkill = "fast"\n', ["kill = 'fast'"]),
    ('moed = "live"\n', ["moed", "unknown setting", "mode"]),
])
def test_bad_values_are_refused_by_name(tmp_path: Path, text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    msg = str(err.value)
    for name in names:
        assert name in msg


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILLCORD_MODE", "yes")
    with pytest.raises(ConfigError, match="KILLCORD_MODE"):
        load(write(tmp_path, ""))


def test_missing_explicit_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="killcord.toml"):
        load(write(tmp_path, "mode = = live\n"))


@pytest.mark.parametrize("append", ["", "memtest=1", 'dyndbg="file x.c +p"', "killcord.wipe_then=reboot",
                                    "movablecore=128M quiet", "memory_hotplug.memmap_on_memory=1"])
def test_harmless_kexec_append_accepted(tmp_path: Path, append: str) -> None:
    assert load(write(tmp_path, f"kexec_append = '{append}'\n")).kexec_append == append


def test_valid_forms_accepted(tmp_path: Path) -> None:
    for medium in ("auto", "/dev/sdb1", "serial:AB12", "uuid:2024-01-01-00-00-00-00", "id-path:pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0"):
        assert load(write(tmp_path, f'medium = "{medium}"\n')).medium == medium
    assert load(write(tmp_path, 'cord = "serial:AB12CD@1-1.2"\npanic_group = "root"\n')).cord == "serial:AB12CD@1-1.2"


# locate.socket: what the client commands use instead of load(). Whatever the sources hold,
# it finds load()'s socket whenever load() accepts the configuration, and gives up (None)
# only where load() refuses it.
SOCKET_VALUES = st.sampled_from(["/run/kc/a.sock", "/tmp/b.sock", "relative.sock", "", "/"])
FILE_TEXTS = st.one_of(
    st.none(),  # no file: the explicit --config path does not exist
    st.sampled_from(["", 'mode = "live"\n', 'mode = "on"\n', "mode = = live\n", "socket = 3\n", 'moed = "live"\n']),
    SOCKET_VALUES.map(lambda v: f"socket = {v!r}\n"),
    st.tuples(SOCKET_VALUES, st.sampled_from(['mode = "on"\n', 'medium = "sdb"\n'])).map(
        lambda t: f"socket = {t[0]!r}\n{t[1]}"),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=FILE_TEXTS, env_socket=st.one_of(st.none(), SOCKET_VALUES),
       env_mode=st.sampled_from([None, "live", "on"]), via_env=st.booleans())
def test_locate_finds_the_socket_load_would(tmp_path: Path, text: str | None, env_socket: str | None,
                                            env_mode: str | None, via_env: bool) -> None:
    import os

    path = tmp_path / "located.toml"
    path.unlink(missing_ok=True)
    if text is not None:
        path.write_text(text)
    env = {"KILLCORD_SOCKET": env_socket, "KILLCORD_MODE": env_mode, "KILLCORD_CONFIG": str(path) if via_env else None}
    saved = {k: os.environ.pop(k, None) for k in env}
    try:
        os.environ.update({k: v for k, v in env.items() if v is not None})
        explicit = None if via_env else path
        found = locate.socket(explicit)
        refused = ""
        try:
            loaded = load(explicit).socket
        except ConfigError as exc:
            loaded, refused = None, str(exc)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    if loaded is not None:
        assert found == loaded
    if found is None:
        assert loaded is None
    if "(KILLCORD_SOCKET)" in refused:  # the socket's own value refused: the client loads it all to say why
        assert found is None, refused


def test_locate_without_a_file_gives_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locate, "DEFAULT_CONFIG", Path("/nonexistent/killcord.toml"))
    assert locate.config_file() is None and locate.socket() == locate.DEFAULT_SOCKET
    monkeypatch.setenv("killcord_socket", "/run/lower.sock")  # pydantic-settings ignores case
    assert locate.socket() == Path("/run/lower.sock")
