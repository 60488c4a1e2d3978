"""An incoming migration is confined as a definition is: the domain XML a Prepare3 carries is
checked by the ``qemu`` backend's same rules (another emulator, a serial log naming a host file,
a disk outside ``storage_dirs``), so a caller who may migrate cannot reach through Prepare what
define refuses.  Each refusal leaves no domain and no file touched.

Define-time refusals one by one: ``test_qemu_confinement.py``.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from pathlib import Path

import pytest

from tests.daemon.backend_qemu_helpers import guest_xml
from virtmig.client.migrate import RemoteDest
from virtmig.daemon.cookie import Cookie, build_cookie
from virtmig.proto.errors import ConfigUnsupported
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import qemu_binary_or_skip, start_host, stop_host


@pytest.mark.qemu
async def test_prepare_is_refused_what_define_is(tmp_path: Path) -> None:
    qemu_binary_or_skip()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"secret")
    host = await start_host(tmp_path, "host", backend="qemu")
    try:
        for devices, why in (
            ("<emulator>/bin/sh</emulator>", "unsupported emulator <emulator>/bin/sh</emulator>"),
            (f"<serial type='file'><source path='{victim}'/><target port='0'/></serial>",
             f"source path '{victim}' is not this guest's serial log"),
            (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source "
             f"file='{outside}'/><target dev='vda' bus='virtio'/></disk>",
             f"source file '{outside}' is outside the storage directories"),
        ):
            uuid = str(uuidlib.uuid4())
            xml = guest_xml(uuid=uuid, devices=devices)
            with pytest.raises(ConfigUnsupported, match=re.escape(why)):
                await host.conn.define(xml)
            cookie = build_cookie(Cookie(name="tiny", uuid=uuid, hostname="src.test",
                                         hostuuid=str(uuidlib.uuid4())))
            for use_params in (True, False):
                with pytest.raises(ConfigUnsupported, match=re.escape(why)):
                    await RemoteDest(host.conn, use_params).prepare(
                        TypedParams.of({MigrateParam.DEST_XML: xml}), cookie, MigrateFlags.LIVE)
        assert await host.conn.list_domains(active=True, inactive=True) == []
        assert not host.daemon.ports._used
    finally:
        await stop_host(host)
    assert victim.read_bytes() == b"precious\n" and outside.read_bytes() == b"secret"
