"""The container tests' images: a cached Debian base made here, and virtmig's image on top.

Concern: build ``deploy/Containerfile`` on a machine that reaches Debian's archive and the
Python package index but no container registry, without network access during the build.

* **Base** (:func:`ensure_base`): ``mmdebstrap --variant=minbase bookworm`` into a tarball,
  ``podman import`` as :data:`BASE_IMAGE`; its ``/var/lib/dpkg/status`` is kept beside it in the
  cache folder.  Built only when the image or that file is missing; it stays between runs.
* **Context** (:func:`build_context`): the ``.deb`` files the Containerfile's packages need on
  top of the base (resolved by the host's ``apt-get`` against the base's dpkg status, fetched
  with ``--download-only`` into the cache folder, and linked into ``debs/``), and the virtmig
  wheel with its dependency wheels (``pip wheel``) in ``wheels/``.
* **Image** (:func:`build_app`): ``podman build --network=none --layers=false --format docker
  --build-arg BASE_IMAGE=...``, tagged with a hash of the Containerfile, the base image and the
  context: an image of that tag already there (kept by ``VIRTMIG_E2E_KEEP_IMAGE=1``) is used
  as it is.
* Cache folder: ``$VIRTMIG_E2E_CACHE`` or ``~/.cache/virtmig/e2e``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.containers.podman import Podman

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
CONFIG = ROOT / "deploy" / "container" / "virtmigd.toml"
BASE_IMAGE = "localhost/virtmig-base:bookworm"
APP_REPO = "localhost/virtmig-e2e"
SUITE = "bookworm"
# The host's archive, as Debian's own containers use it (the .debs must match the base).
SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
COMMAND_TIMEOUT = 1200.0
INST = re.compile(r"^Inst (\S+) (?:\[[^]]*\] )?\((\S+) .*\[(\S+)\]\)", re.M)


class ImageError(Exception):
    """An image or its context could not be made; ``str()`` says why."""


def cache_dir() -> Path:
    env = os.environ.get("VIRTMIG_E2E_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "virtmig" / "e2e"


def _run(cmd: list[str], **kw: object) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=COMMAND_TIMEOUT, check=False,
                              **kw)  # type: ignore[call-overload]
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{' '.join(cmd)}: {exc}") from exc
    if done.returncode:
        raise ImageError(f"{' '.join(cmd)} exited {done.returncode}:\n"
                         f"{done.stderr.decode(errors='replace')[-4000:]}")
    return str(done.stdout.decode(errors="replace"))


def base_status() -> Path:
    return cache_dir() / "base-dpkg-status"


def ensure_base(podman: Podman) -> None:
    """The base image, made with mmdebstrap and imported if it (or its dpkg status) is missing."""
    status = base_status()
    if podman.exists("image", BASE_IMAGE) and status.exists():
        return
    cache_dir().mkdir(parents=True, exist_ok=True)
    tarball = cache_dir() / "base.tar"
    try:
        _run(["mmdebstrap", "--variant=minbase", "--quiet", SUITE, str(tarball), *SOURCES])
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("./var/lib/dpkg/status")
            if member is None:
                raise ImageError(f"{tarball} has no /var/lib/dpkg/status")
            status.write_bytes(member.read())
        podman("import", "--change", "CMD=/bin/bash", str(tarball), BASE_IMAGE)
    finally:
        tarball.unlink(missing_ok=True)


def containerfile_packages() -> list[str]:
    """The Debian packages the Containerfile installs (its ``ARG PACKAGES="..."``)."""
    match = re.search(r'^ARG PACKAGES="([^"]+)"', CONTAINERFILE.read_text(), re.M)
    if not match:
        raise ImageError(f"{CONTAINERFILE} has no ARG PACKAGES=\"...\"")
    return match.group(1).split()


def fetch_debs(dest: Path) -> list[Path]:
    """The .debs the Containerfile's packages need on top of the base, linked into ``dest``."""
    archives = cache_dir() / "debs"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    opts = [f"-oDir::State::status={base_status()}", f"-oDir::Cache::archives={archives}",
            "-oAPT::Install-Recommends=false", "-oDebug::NoLocking=true"]
    packages = containerfile_packages()
    plan = _run(["apt-get", "-s", *opts, "install", *packages],
                env={**os.environ, "LC_ALL": "C"})
    wanted = [f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
              for name, version, arch in INST.findall(plan)]
    if not wanted:
        raise ImageError(f"apt-get planned nothing for {packages}:\n{plan[-2000:]}")
    _run(["apt-get", "-y", "-q", "--download-only", *opts, "install", *packages])
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in wanted:
        deb = archives / name
        if not deb.exists():
            raise ImageError(f"apt-get did not fetch {name} into {archives}")
        try:
            os.link(deb, dest / name)
        except OSError:  # another file system
            shutil.copyfile(deb, dest / name)
        out.append(dest / name)
    return out


def build_wheels(dest: Path) -> None:
    """virtmig's wheel and its dependencies' wheels in ``dest`` (pip from the package index)."""
    dest.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(ROOT)])


def build_context(context: Path) -> Path:
    """``context``: debs/, wheels/ and the default config for the Containerfile."""
    context.mkdir(parents=True, exist_ok=True)
    (context / "virtmigd.toml").write_bytes(CONFIG.read_bytes())
    fetch_debs(context / "debs")
    build_wheels(context / "wheels")
    return context


def _digest(podman: Podman, context: Path) -> str:
    h = hashlib.sha256(CONTAINERFILE.read_bytes())
    h.update(podman.text("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE).encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        h.update(path.relative_to(context).as_posix().encode())
        if path.suffix == ".whl" and path.name.startswith("virtmig-"):
            # a wheel's zip records file times: hash what it holds, not when it was built
            h.update(_wheel_content(path))
        else:
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _wheel_content(path: Path) -> bytes:
    import zipfile

    h = hashlib.sha256()
    with zipfile.ZipFile(path) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            h.update(info.filename.encode())
            h.update(hashlib.sha256(zf.read(info)).digest())
    return h.digest()


def build_app(podman: Podman, context: Path, *, keep: bool) -> str:
    """The virtmig image built from ``context`` (removed at clean-up unless ``keep``)."""
    tag = f"{APP_REPO}:{_digest(podman, context)}"
    if not keep:
        podman.track_image(tag)
    if podman.exists("image", tag):
        return tag
    podman("build", "--network=none", "--layers=false", "--format", "docker", "--pull=never",
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag, "-f",
           str(CONTAINERFILE), str(context))
    return tag
