"""VNC on the qemu backend: passwords (``<graphics type='vnc' passwd= passwdValidTo=>``) on the
command line and over QMP, hidden from ``dumpxml`` unless asked for, never logged; with real
QEMU, an RFB handshake on loopback sees VNC authentication (security type 2) instead of none
(1), takes the password and refuses others, also on a migration's destination.  VNC on a unix
socket (``<listen type='socket'>``) in QEMU's own folder of the guest's folder: other paths
refused; with real QEMU, the RFB banner on that socket, on both sides of a migration.
"""

from __future__ import annotations

import calendar
import logging
import os
import re
import stat
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import guest_xml, make_spec, to, within
from virtmig.daemon.backend.base import MigrationStatus, MigrationTuning
from virtmig.daemon.backend.qemu import GuestFiles, QemuBackend, QemuSettings, parse_config
from virtmig.daemon.backend.qemu.graphics import password_commands
from virtmig.daemon.backend.qemu.monitor import _Monitor, _socket_path
from virtmig.daemon.backend.qemu.runtime import Runtime
from virtmig.daemon.domxml import format_domain_xml, parse_domain_xml
from virtmig.proto.errors import ConfigUnsupported
from virtmig.testing import free_port, wait_until
from virtmig.testing.vnc import NONE, VNC_AUTH, vnc_handshake

backends = backend_qemu_helpers.backends
src = backend_qemu_helpers.src
dst = backend_qemu_helpers.dst

EMU = "/usr/bin/qemu-system-x86_64"
SETTINGS = QemuSettings(emulators=(EMU,))
SECRET = "s3cr&t!"  # (an XML-escaped character on the way)
GRAPHICS = "<graphics type='vnc' passwd='s3cr&amp;t!'/>"


def _cfg(devices: str) -> Any:
    return parse_config(make_spec(guest_xml(devices=devices)), None, SETTINGS)


def _vnc_arg(devices: str) -> str:
    argv = _cfg(devices).argv(GuestFiles(), incoming=False)
    return str(argv[argv.index("-vnc") + 1])


def test_password_on_the_command_line_and_over_qmp() -> None:
    assert _vnc_arg(GRAPHICS) == "127.0.0.1:0,to=59635,password=on"
    assert _vnc_arg("<graphics type='vnc' port='5999' autoport='no' passwd='x'/>") == \
        "127.0.0.1:99,password=on"
    assert _vnc_arg("<graphics type='vnc'/>") == "127.0.0.1:0,to=59635"
    cfg = _cfg(GRAPHICS)
    assert SECRET not in " ".join(cfg.argv(GuestFiles(), incoming=False))  # QMP only
    assert SECRET not in repr(cfg)
    assert password_commands(cfg.vnc) == [
        ("set_password", {"protocol": "vnc", "password": SECRET}),
        ("expire_password", {"protocol": "vnc", "time": "never"})]
    until = _cfg("<graphics type='vnc' passwd='x' passwdValidTo='2031-02-03T04:05:06'/>")
    epoch = calendar.timegm(time.strptime("2031-02-03 04:05:06", "%Y-%m-%d %H:%M:%S"))
    assert password_commands(until.vnc)[1] == ("expire_password",
                                               {"protocol": "vnc", "time": str(epoch)})
    assert password_commands(_cfg("<graphics type='vnc'/>").vnc) == []
    assert password_commands(None) == []


@pytest.mark.parametrize(("attrs", "message"), [
    ("passwd='123456789'", "passwd of 9 characters (1-8"),
    ("passwd=''", "passwd of 0 characters"),
    ("passwd='a&#9;b'", "passwd with a character that is not printable ASCII"),
    ("passwd='pässwd'", "not printable ASCII"),
    ("passwd='x' passwdValidTo='tomorrow'", "passwdValidTo 'tomorrow' (YYYY-MM-DDTHH:MM:SS"),
    ("passwd='x' passwdValidTo='2031-02-30T00:00:00'", "passwdValidTo '2031-02-30T00:00:00'"),
    ("passwdValidTo='2031-02-03T04:05:06'", "passwdValidTo without passwd"),
    ("passwd='x' connected='keep'", "attribute 'connected' of <graphics>"),
])
def test_bad_passwords_are_refused_without_quoting_them(attrs: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        _cfg(f"<graphics type='vnc' {attrs}/>")
    assert message in str(info.value)
    assert "unsupported device <graphics type='vnc'> for the qemu backend" in str(info.value)
    assert "123456789" not in str(info.value) and "pässwd" not in str(info.value)


def test_dumpxml_hides_the_password_unless_secure() -> None:
    d = parse_domain_xml(guest_xml(devices=GRAPHICS))
    for migratable in (False, True):
        shown = format_domain_xml(d, migratable=migratable, secure=False)
        assert "passwd" not in shown and "<graphics type=\"vnc\"/>" in shown
        secure = format_domain_xml(d, migratable=migratable)  # Begin's: the destination's too
        assert "passwd=\"s3cr&amp;t!\"" in secure
    plain = parse_domain_xml(guest_xml(devices="<graphics type='vnc'/>"))
    assert format_domain_xml(plain, secure=False) is plain.xml


def test_the_monitor_never_logs_a_password(caplog: pytest.LogCaptureFixture) -> None:
    monitor = _Monitor("qemu-test")
    caplog.set_level(logging.DEBUG, logger=monitor.logger.name)
    message: Any = {"execute": "set_password", "arguments": {"protocol": "vnc",
                                                             "password": SECRET}}
    assert monitor._cb_outbound(message) is message  # sent as it is
    other: Any = {"execute": "query-vnc"}
    monitor._cb_outbound(other)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert SECRET not in logged and "<hidden>" in logged and "query-vnc" in logged


async def _port(backend: QemuBackend, uuid: str) -> int:
    return int((await backend.query(uuid, "query-vnc"))["service"])


@pytest.mark.qemu
async def test_vnc_password_guards_the_display_there_and_after_a_migration(
        src: QemuBackend, dst: QemuBackend) -> None:
    open_spec = make_spec(guest_xml(name="open", devices="<graphics type='vnc'/>"))
    await within(src.start(open_spec, paused=True))
    shake = await within(vnc_handshake(port=await _port(src, open_spec.uuid)))
    assert shake.banner.startswith(b"RFB 003.00") and shake.types == (NONE,)

    spec = make_spec(guest_xml(devices=GRAPHICS))
    await within(src.start(spec, paused=False))
    port = await _port(src, spec.uuid)
    assert (await within(vnc_handshake(port=port))).types == (VNC_AUTH,)
    assert (await within(vnc_handshake(port=port, password=SECRET))).accepted is True
    assert (await within(vnc_handshake(port=port, password="wrong"))).accepted is False

    migratable = format_domain_xml(parse_domain_xml(src.live_xml(spec.uuid, spec.xml)),
                                   migratable=True)
    dst_spec = make_spec(dst.canonicalize(make_spec(migratable)))
    incoming = await within(dst.incoming_start(dst_spec, to(free_port())))
    out = await within(src.outgoing(spec.uuid, to(incoming), MigrationTuning()), 60)
    assert out.status is MigrationStatus.COMPLETED
    assert (await within(dst.incoming_wait(spec.uuid), 60)).status is MigrationStatus.COMPLETED
    moved = await _port(dst, spec.uuid)
    assert (await within(vnc_handshake(port=moved))).types == (VNC_AUTH,)
    assert (await within(vnc_handshake(port=moved, password=SECRET))).accepted is True
    assert (await within(vnc_handshake(port=moved, password="s3cr&t?"))).accepted is False


@pytest.mark.qemu
async def test_an_expired_vnc_password_lets_nobody_in(src: QemuBackend) -> None:
    spec = make_spec(guest_xml(devices="<graphics type='vnc' passwd='old' "
                                       "passwdValidTo='2001-01-01T00:00:00'/>"))
    await within(src.start(spec, paused=True))
    shake = await within(vnc_handshake(port=await _port(src, spec.uuid), password="old"))
    assert shake.types == (VNC_AUTH,) and shake.accepted is False


# --- VNC on a unix socket --------------------------------------------------------------------


def _cfg_of(devices: str, uuid: str) -> Any:
    return parse_config(make_spec(guest_xml(uuid=uuid, devices=devices)), None, SETTINGS)


def test_vnc_on_a_unix_socket_in_qemus_own_folder() -> None:
    uuid = str(uuidlib.uuid4())
    for devices in ("<graphics type='vnc'><listen type='socket'/></graphics>",
                    f"<graphics type='vnc' autoport='yes'><listen type='socket' "
                    f"socket='/var/lib/elsewhere/{uuid}/vnc/vnc.sock'/></graphics>",
                    f"<graphics type='vnc' socket='/srv/a/{uuid}/vnc/vnc.sock'/>"):
        cfg = _cfg_of(devices, uuid)
        argv = cfg.argv(GuestFiles(), incoming=False)
        assert argv[argv.index("-vnc") + 1] == "unix:vnc/vnc.sock"  # never the path given
        assert cfg.vnc.socket
    with_password = _cfg_of("<graphics type='vnc' passwd='x'><listen type='socket'/></graphics>",
                            uuid)
    argv = with_password.argv(GuestFiles(), incoming=False)
    assert argv[argv.index("-vnc") + 1] == "unix:vnc/vnc.sock,password=on"


@pytest.mark.parametrize(("devices", "message"), [
    ("<listen type='socket' socket='/tmp/vnc.sock'/>", "socket '/tmp/vnc.sock' (only the "
     "daemon's own, vnc/vnc.sock in the guest's folder, which QEMU may create: leave socket "
     "out)"),
    ("<listen type='socket' socket='/x/OTHER/vnc/vnc.sock'/>", "socket '/x/OTHER/vnc/vnc.sock'"),
    ("<listen type='socket' socket='/x/UUID/vnc/../vnc/vnc.sock'/>", "socket '/x/UUID/vnc/.."),
    ("<listen type='socket' socket='UUID/vnc/vnc.sock'/>", "socket 'UUID/vnc/vnc.sock'"),
    ("<listen type='socket' socket='/x/UUID/vnc/other.sock'/>", "socket '/x/UUID/vnc/other"),
    ("<listen type='socket' address='127.0.0.1'/>", "attribute 'address' of <listen>"),
])
def test_vnc_socket_paths_outside_the_daemons_folder_are_refused(devices: str,
                                                                 message: str) -> None:
    uuid = str(uuidlib.uuid4())
    with pytest.raises(ConfigUnsupported) as info:
        _cfg_of(f"<graphics type='vnc'>{devices.replace('UUID', uuid)}</graphics>", uuid)
    assert message.replace("UUID", uuid) in str(info.value)
    assert "unsupported device <graphics type='vnc'>" in str(info.value)


@pytest.mark.parametrize(("graphics", "message"), [
    ("<graphics type='vnc' port='5901' autoport='no'><listen type='socket'/></graphics>",
     "attribute 'port' with a unix socket"),
    ("<graphics type='vnc' listen='127.0.0.1'><listen type='socket'/></graphics>",
     "attribute 'listen' with a unix socket"),
    ("<graphics type='vnc' autoport='no'><listen type='socket'/></graphics>",
     "autoport='no' with a unix socket"),
    ("<graphics type='vnc' socket='/a/U/vnc/vnc.sock'><listen type='socket' "
     "socket='/b/U/vnc/vnc.sock'/></graphics>", "socket and <listen socket=> differ"),
    ("<graphics type='vnc' socket='/a/U/vnc/vnc.sock'><listen type='address'/></graphics>",
     "<listen type='address'> and a socket"),
])
def test_vnc_socket_with_a_port_or_an_address_is_refused(graphics: str, message: str) -> None:
    uuid = str(uuidlib.uuid4())
    with pytest.raises(ConfigUnsupported, match=re.escape(message)):
        _cfg_of(graphics.replace("/U/", f"/{uuid}/"), uuid)


def test_the_live_xml_names_this_hosts_socket() -> None:
    xml = guest_xml(devices="<graphics type='vnc'><listen type='socket'/></graphics>")
    live = Runtime(vnc_socket="/state/U/vnc/vnc.sock").apply(xml)
    assert "<listen type=\"socket\" socket=\"/state/U/vnc/vnc.sock\"/>" in live
    old = guest_xml(devices="<graphics type='vnc' socket='/a/U/vnc/vnc.sock'/>")
    live = Runtime(vnc_socket="/b/U/vnc/vnc.sock").apply(old)
    assert "socket=\"/a/" not in live and live.count("/b/U/vnc/vnc.sock") == 2


def _listen_socket(xml: str) -> Path:
    """The ``<listen type='socket' socket=>`` of a live definition."""
    lst = etree.fromstring(xml).find("devices/graphics/listen[@type='socket']")
    assert lst is not None
    return Path(lst.get("socket", ""))


@pytest.mark.qemu
async def test_vnc_on_a_unix_socket_answers_there_and_after_a_migration(
        src: QemuBackend, dst: QemuBackend) -> None:
    spec = make_spec(guest_xml(devices="<graphics type='vnc'><listen type='socket'/>"
                                       "</graphics>"))
    await within(src.start(spec, paused=False))
    live = src.live_xml(spec.uuid, spec.xml)
    path = _listen_socket(live)
    assert path == src._state_dir() / spec.uuid / "vnc" / "vnc.sock"
    with _socket_path(path) as reachable:
        shake = await within(vnc_handshake(socket=Path(reachable)))
    assert shake.banner.startswith(b"RFB 003.00") and shake.types == (NONE,)
    folder = path.parent.stat()
    assert stat.S_IMODE(folder.st_mode) == 0o750  # QEMU's own folder, nothing more
    owner = src._owner  # QEMU's user (None: the daemon's own)
    assert folder.st_uid == (owner.uid if owner is not None else os.getuid())
    assert path.parent.parent.stat().st_uid == os.getuid()  # the guest's folder stays ours

    migratable = format_domain_xml(parse_domain_xml(live), migratable=True)
    assert str(path) in migratable  # the source's path: re-pointed by the destination
    dst_spec = make_spec(dst.canonicalize(make_spec(migratable)))
    incoming = await within(dst.incoming_start(dst_spec, to(free_port())))
    out = await within(src.outgoing(spec.uuid, to(incoming), MigrationTuning()), 60)
    assert out.status is MigrationStatus.COMPLETED
    assert (await within(dst.incoming_wait(spec.uuid), 60)).status is MigrationStatus.COMPLETED
    moved = _listen_socket(dst.live_xml(spec.uuid, dst_spec.xml))
    assert moved == dst._state_dir() / spec.uuid / "vnc" / "vnc.sock"
    with _socket_path(moved) as reachable:
        assert (await within(vnc_handshake(socket=Path(reachable)))).types == (NONE,)
    await within(src.destroy(spec.uuid))
    await wait_until(lambda: not path.parent.exists(), timeout=10,
                     what="the source's VNC folder removed once its QEMU exited")
