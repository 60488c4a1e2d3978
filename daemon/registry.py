"""The domain registry: every domain this daemon knows, its state with reason, and its files.

A domain object holds the persistent definition (``config``, None for a transient domain), the
live definition while active, libvirt's state and reason, and at most one migration job.  Read-only
calls read these fields directly and never wait; state-changing calls run under the object's lock,
and wait (bounded) for a conflicting migration job to end, as libvirt's job masks have it.

Bounds: a lookup refuses an over-long name or UUID before it searches, and :meth:`check_define`
refuses a new domain beyond ``max_domains`` (:data:`MAX_DOMAINS` at most: a bound on the
daemon's memory; lists of any length stream, see ``ListStream``); :meth:`Registry.load` loads
no more than :data:`MAX_DOMAINS` from the state dir, whatever files it holds.  Every lookup,
addition and removal costs the same however many domains there are (dicts by UUID and name),
so loading a state dir is linear in its files; and so do the counts a migration or a connection
reads (:meth:`Registry.jobs`, :meth:`Registry.active_count`: sets the domain objects keep up to
date through :meth:`Registry.track`, never a walk over every domain).

Many definitions (issue 17): a load takes each definition's name from the definition index
(:mod:`virtmig.daemon.domindex`) when the index's entry matches the file, and leaves it
*pending*: :meth:`Registry.resolve` parses it on first use (every lookup does, before it
returns the domain), with the checks of a load, and drops a domain whose file no longer passes
them as a load drops an unreadable file.  A definition without a matching entry is parsed at
load, as are the definitions of domains with a status file (before the status is judged).

Durability: a status write is fsynced only when :func:`status_needs_fsync` says recovery after a
power loss reads it; :meth:`Registry.save_status_durably` (job ends, Perform's perform3_done)
waits for that fsync in a worker thread, so the daemon serves other calls meanwhile.

Observability: :meth:`Registry.save_status` is where a job's phase change becomes durable, so it
is also where the registry's ``observer`` (:class:`~virtmig.daemon.audit.Audit`: logs, metrics)
hears of it; :meth:`Registry.end_job` tells it of the job's end (history, outcome line).
"""

from __future__ import annotations

import contextlib
import gc
import operator
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from lxml import etree

from virtmig import __version__
from virtmig.daemon import domindex, statusxml
from virtmig.daemon import state as files
from virtmig.daemon.audit import Audit
from virtmig.daemon.domindex import DomainIndex
from virtmig.daemon.domobj import DomainObj as DomainObj  # re-exported: its old home
from virtmig.daemon.domxml import DomainDef, check_name_length, parse_domain_xml
from virtmig.daemon.job import AsyncJob, JobRecord
from virtmig.daemon.statusxml import status_needs_fsync
from virtmig.proto import logsafe
from virtmig.proto.aio import within
from virtmig.proto.errors import (
    InvalidArgument,
    NoDomain,
    OperationFailed,
    OperationTimeout,
    ResourceExhausted,
    XMLError,
)

log = logsafe.logger(__name__)

#: The most domains a daemon may hold (``max_domains`` is at most this) and loads from its state
#: dir: a bound on its memory (a domain costs a few KiB; see bench/README.md), not on a reply's
#: size (``ListStream`` sends any number of domains in chunks).
MAX_DOMAINS = 1_000_000
#: ``max_domains``'s default.
DEFAULT_MAX_DOMAINS = 100_000

_NAME = operator.attrgetter("name")

# A UUID in its longest accepted spelling (libvirt's: '-' or ' ' between any hex pairs).
_MAX_UUID_CHARS = 64


class Registry:
    def __init__(self, state_dir: files.StateDir, *, job_wait_timeout: float = 30.0,
                 max_domains: int = MAX_DOMAINS) -> None:
        self._files = state_dir
        self.max_domains = max_domains
        self._by_uuid: dict[str, DomainObj] = {}
        self._by_name: dict[str, DomainObj] = {}
        # Kept as domains change (DomainObj tells track()): nothing walks every domain for them.
        # (dicts as ordered sets: iterated in the order domains got there)
        self._active: dict[DomainObj, None] = {}
        self._with_job: dict[DomainObj, None] = {}
        self.index = DomainIndex(state_dir.root / "domains.index", __version__)
        self.parsed = 0  # definitions parsed at load and on first use (tests count them)
        self._next_id = 1
        self.job_wait_timeout = job_wait_timeout
        # Called after a job ended with a record (the daemon emits the job event).
        self.on_job_end: Callable[[DomainObj, JobRecord], None] | None = None
        # Told of every phase change (when the status file saves it) and every job's end:
        # logs, history, metrics (virtmig.daemon.audit).
        self.observer: Audit | None = None

    # --- lookup (never waits) -------------------------------------------------------------------

    def __iter__(self) -> Iterator[DomainObj]:
        return iter(list(self._by_uuid.values()))

    def __len__(self) -> int:
        return len(self._by_uuid)

    def by_name(self, name: str) -> DomainObj:
        check_name_length(name)  # refused before anything echoes it
        dom = self._resolved(self._by_name.get(name))
        if dom is None:
            raise NoDomain(f"no domain with matching name '{name}'")
        return dom

    def by_uuid(self, uuid: str) -> DomainObj:
        if len(uuid) > _MAX_UUID_CHARS:
            raise InvalidArgument(f"domain uuid is too long: {len(uuid)} characters")
        dom = self._resolved(self._by_uuid.get(uuid.lower()))
        if dom is None:
            raise NoDomain(f"no domain with matching uuid '{uuid}'")
        return dom

    def find_uuid(self, uuid: str) -> DomainObj | None:
        """The domain of canonical (lowercase) ``uuid``, if this daemon holds one."""
        return self._resolved(self._by_uuid.get(uuid))

    def find_name(self, name: str) -> DomainObj | None:
        check_name_length(name)
        return self._resolved(self._by_name.get(name))

    def _resolved(self, dom: DomainObj | None) -> DomainObj | None:
        """``dom`` with its definition parsed (None if it no longer parses: it is dropped)."""
        if dom is None or not dom.pending or self.resolve(dom):
            return dom
        return None

    def resolve(self, dom: DomainObj) -> bool:
        """Parse ``dom``'s pending definition (a load took its name from the definition index)
        with the checks of a load; False if it fails them: the domain is dropped, as a load
        drops an unreadable definition (logged at ERROR, the file left where it is, its index
        entry forgotten: the next start parses it and applies every rule of a load)."""
        if not dom.pending:
            return True
        path = self._files.definition_path(dom.uuid)
        try:
            d = self._parse(path)
            if d.uuid != dom.uuid or d.name != dom.name:
                raise XMLError(f"it names domain {d.name!r} ({d.uuid}), indexed as "
                               f"{dom.name!r} ({dom.uuid}): changed since the daemon started")
        except (OSError, XMLError) as exc:
            log.error("ignoring unreadable definition %s: %s", path, exc)
            self.index.drop(path.name)
            self._unlist(dom)
            return False
        dom.config = d
        return True

    def _parse(self, path: Path) -> DomainDef:
        self.parsed += 1
        return parse_domain_xml(path.read_bytes())

    def active_count(self) -> int:
        return len(self._active)

    def jobs(self, kind: AsyncJob | None = None) -> list[DomainObj]:
        """The domains with a migration job (of ``kind``): O(jobs), not O(domains)."""
        return [d for d in self._with_job if kind is None or
                (d.job is not None and d.job.kind is kind)]

    def listing(self, *, active: bool, inactive: bool) -> list[DomainObj]:
        """``virsh list``'s order: active domains by id (one without an id by name, after
        them), then inactive ones by name."""
        up: list[DomainObj] = []
        down: list[DomainObj] = []
        if active:
            up = list(self._active)
        if inactive:
            down = [d for d in self._by_uuid.values() if not d.active] if self._active else \
                list(self._by_uuid.values())
        up.sort(key=lambda d: (d.id < 0, d.id if d.id >= 0 else 0, d.name))
        down.sort(key=_NAME)
        return up + down

    # --- membership -----------------------------------------------------------------------------

    def add(self, dom: DomainObj) -> DomainObj:
        self._by_uuid[dom.uuid] = dom
        self._by_name[dom.name] = dom
        dom.holder = self
        self.track(dom)
        return dom

    def track(self, dom: DomainObj) -> None:
        """``dom``'s state, id or job changed: keep the sets of active domains and of domains
        with a job."""
        if dom.holder is not self:
            return
        if dom.active:
            self._active[dom] = None
        else:
            self._active.pop(dom, None)
        if dom.job is not None:
            self._with_job[dom] = None
        else:
            self._with_job.pop(dom, None)

    def rename(self, dom: DomainObj, name: str) -> None:
        if self._by_name.get(dom.name) is dom:
            del self._by_name[dom.name]
        dom.name = name
        self._by_name[name] = dom

    def remove(self, dom: DomainObj) -> None:
        """Forget ``dom`` and its status file."""
        self._unlist(dom)
        files.remove(self._files.status_path(dom.uuid), sync_dir=False)

    def _unlist(self, dom: DomainObj) -> None:
        if self._by_uuid.get(dom.uuid) is dom:
            del self._by_uuid[dom.uuid]
        if self._by_name.get(dom.name) is dom:
            del self._by_name[dom.name]
        if dom.holder is self:
            dom.holder = None
            self._active.pop(dom, None)
            self._with_job.pop(dom, None)

    def check_define(self, d: DomainDef) -> DomainObj | None:
        """libvirt's name/UUID clash rules for adding ``d``; returns the existing object, if any."""
        by_uuid = self._resolved(self._by_uuid.get(d.uuid))
        if by_uuid is not None and by_uuid.name != d.name:
            raise OperationFailed(f"domain '{by_uuid.name}' is already defined with uuid {d.uuid}")
        by_name = self._resolved(self._by_name.get(d.name))
        if by_name is not None and by_name.uuid != d.uuid:
            raise OperationFailed(f"domain '{d.name}' already exists with uuid {by_name.uuid}")
        if by_uuid is None and len(self._by_uuid) >= self.max_domains:
            raise ResourceExhausted(
                f"cannot add domain '{d.name}': this host holds {len(self._by_uuid)} domains, "
                f"the limit (max_domains) is {self.max_domains}"
            )
        return by_uuid

    def new_id(self) -> int:
        value = self._next_id
        self._next_id += 1
        return value

    # --- jobs -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def state_change(
        self, dom: DomainObj, api: str, *, allowed_during: frozenset[AsyncJob] = frozenset()
    ) -> AsyncIterator[DomainObj]:
        """Run a state-changing call: wait (bounded) for a conflicting migration job, then lock."""
        deadline = time.monotonic() + self.job_wait_timeout
        async with dom.job_changed:
            while dom.job is not None and dom.job.kind not in allowed_during:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OperationTimeout(
                        "cannot acquire state change lock "
                        f"(held by async job '{dom.job.kind.value}' in phase "
                        f"'{dom.job.phase.label}') for {api}"
                    )
                with contextlib.suppress(TimeoutError):
                    await within(dom.job_changed.wait(), left)
        async with dom.lock:
            yield dom

    async def end_job(self, dom: DomainObj, record: JobRecord | None, *,
                      save: bool = True) -> None:
        """End the job; ``save=False`` when the caller writes the status itself right after
        (nothing a crash could stop in between needs the job-less status on disk)."""
        job, dom.job = dom.job, None
        if record is not None:
            dom.completed = record
        if save:
            await self.save_status_durably(dom)
        await self.job_changed(dom)
        if record is not None and job is not None and self.observer is not None:
            self.observer.ended(dom, job, record, time.monotonic() - job.reported_at)
        if record is not None and self.on_job_end is not None:
            self.on_job_end(dom, record)

    async def job_changed(self, dom: DomainObj) -> None:
        """Wake whoever waits on the job: state changes, job watchers."""
        async with dom.job_changed:
            dom.job_changed.notify_all()

    # --- files ----------------------------------------------------------------------------------

    def save_config(self, dom: DomainObj) -> None:
        """Write (or remove) ``dom``'s definition file, then its definition index record (a
        crash in between leaves a file its index entry does not match: parsed at start)."""
        path = self._files.definition_path(dom.uuid)
        config = dom.config
        if config is None:
            files.remove(path)
            self.index.drop(path.name)
        else:
            files.atomic_write(path, config.xml.encode())
            self.index.put(path.name, path, config.name)

    def save_status(self, dom: DomainObj) -> None:
        """Write the status file (or remove it once the domain is inactive with no job); it is
        fsynced when :func:`status_needs_fsync` says a power loss must not lose it."""
        path = self._files.status_path(dom.uuid)
        data = self._status_data(dom)
        if data is None:
            files.remove(path, sync_dir=False)
        else:
            files.atomic_write(path, data, sync_dir=False, fsync=status_needs_fsync(dom.job))

    async def save_status_durably(self, dom: DomainObj) -> None:
        """:meth:`save_status`, with the fsync it needs (if any) in a worker thread: the daemon
        serves other calls meanwhile; the caller goes on once the status is durable."""
        if not status_needs_fsync(dom.job):
            self.save_status(dom)
            return
        path = self._files.status_path(dom.uuid)
        data = self._status_data(dom)
        if data is None:
            files.remove(path, sync_dir=False)
        else:
            await files.atomic_write_durably(path, data, sync_dir=False)

    def _status_data(self, dom: DomainObj) -> bytes | None:
        """The status file's bytes (None: no status file, :func:`.statusxml.render`); tells the
        observer of a new phase first."""
        job = dom.job
        if job is not None and job.phase is not job.reported_phase:
            now = time.monotonic()
            old, job.reported_phase = job.reported_phase, job.phase
            spent, job.reported_at = now - job.reported_at, now
            if self.observer is not None:
                self.observer.phase(dom, job, old, spent)
        return statusxml.render(dom)

    def load(self) -> list[tuple[DomainObj, etree._Element]]:
        """Load persistent definitions and live status files; return objects that have status.

        Files are read in file-name order; the rules (see ``virtmig.daemon.state``), each
        reported at WARNING with the file moved aside (``.rejected``):

        * a definition must be ``domains/<its uuid>.xml``, and its name and UUID must not be
          taken by a definition read before it (the first one is kept);
        * no more than :data:`MAX_DOMAINS` domains are loaded (``max_domains`` only refuses new
          ones, so a lowered value drops nothing);
        * a status file must be ``status/<uuid>.xml`` for its live definition's UUID; with a
          definition of that UUID, its live name must be the definition's; without one, it must
          be a transient domain's (``persistent="no"``) whose name no other domain has, within
          :data:`MAX_DOMAINS`.

        The caller (the daemon) decides, with the backend, what a status file means now.  The
        cyclic garbage collector is off meanwhile: with objects that all stay, its passes over
        the growing heap are wasted (a large share of the time with 100,000 definitions).
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._load_definitions()
            return self._load_statuses()
        finally:
            if enabled:
                gc.enable()

    def _load_definitions(self) -> None:
        """Every definition file, by file name: its name from the definition index when the
        index's entry matches the file (left *pending*, parsed on first use), else parsed."""
        indexed, rewrite = self.index.read()
        folder = self._files.domains
        fresh: list[str] = []
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for file in _xml_names(folder):
                try:
                    st = os.stat(file, dir_fd=fd)
                except OSError as exc:
                    log.error("ignoring unreadable definition %s: %s", folder / file, exc)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                record = indexed.get(file)
                start = domindex.prefix(file, st)
                if record is not None and record.startswith(start):
                    self._load_indexed(file, record[len(start):], record)
                elif self._load_parsed(folder / file, st):
                    fresh.append(file)
        finally:
            os.close(fd)
        if rewrite:
            self.index.rewrite()
        else:  # new and changed files: one record each
            for file in fresh:
                self.index.put(file, folder / file, self._by_uuid[file[:-4]].name)

    def _load_indexed(self, file: str, name: str, record: str) -> None:
        """A definition whose index entry matches its file: pending (its uuid is its file
        name: the index holds only files that passed this rule)."""
        uuid = file[:-4]
        if len(self._by_uuid) >= MAX_DOMAINS or uuid in self._by_uuid or name in self._by_name:
            self._reject(self._files.domains / file, self._definition_problem(uuid, uuid, name))
            return
        dom = DomainObj(uuid, name)
        dom.pending = True
        dom.holder = self  # inactive, no job: in neither kept set
        self._by_uuid[uuid] = self._by_name[name] = dom
        self.index.keep(file, record)

    def _load_parsed(self, path: Path, st: os.stat_result) -> bool:
        """A definition the index does not describe (as it is now): parsed, as at every start
        before the index.  True if it was loaded."""
        try:
            d = self._parse(path)
        except (OSError, XMLError) as exc:
            log.error("ignoring unreadable definition %s: %s", path, exc)
            return False
        problem = self._definition_problem(path.stem, d.uuid, d.name)
        if problem:
            self._reject(path, problem)
            return False
        self.add(DomainObj(d.uuid, d.name, config=d))
        self.index.keep(path.name, domindex.body(path.name, st, d.name))
        return True

    def _load_statuses(self) -> list[tuple[DomainObj, etree._Element]]:
        with_status = []
        for path in _xml_files(self._files.status):
            try:
                root = etree.fromstring(
                    path.read_bytes(), etree.XMLParser(resolve_entities=False, no_network=True)
                )
                dom_el = root.find("domain")
                live = parse_domain_xml(etree.tostring(dom_el)) if dom_el is not None else None
            except (OSError, etree.XMLSyntaxError, XMLError) as exc:
                log.error("ignoring unreadable status %s: %s", path, exc)
                continue
            # A domain with a status is parsed now (its definition is needed at once, and it
            # is one of few): one that fails is dropped before its status is judged, as a load
            # without the index would have.
            dom = self._resolved(self._by_uuid.get(path.stem))
            if dom is None and live is None:
                files.remove(path, sync_dir=False)
                continue
            problem = self._status_problem(path, root, dom, live)
            if problem:
                self._reject(path, problem)
                continue
            if dom is None and live is not None:
                dom = self.add(DomainObj(uuid=live.uuid, name=live.name))
            assert dom is not None
            dom.live = live
            with_status.append((dom, root))
        return with_status

    def _definition_problem(self, stem: str, uuid: str, name: str) -> str:
        if stem != uuid:
            return f"its file name does not match its uuid {uuid}"
        if len(self._by_uuid) >= MAX_DOMAINS:
            return f"a daemon holds at most {MAX_DOMAINS} domains"
        if uuid in self._by_uuid:
            return f"uuid {uuid} is already defined by {self._by_uuid[uuid].name!r}"
        if name in self._by_name:
            return f"name {name!r} is already defined with uuid {self._by_name[name].uuid}"
        return ""

    def _status_problem(self, path: Path, root: etree._Element, dom: DomainObj | None,
                        live: DomainDef | None) -> str:
        if live is not None and live.uuid != path.stem:
            return f"its file name does not match its domain's uuid {live.uuid}"
        if dom is not None:
            if live is not None and live.name != dom.name:
                return (f"its domain is named {live.name!r}, the definition of uuid {dom.uuid} "
                        f"{dom.name!r}")
            return ""
        assert live is not None
        if root.get("persistent") != "no":
            return f"no definition of uuid {live.uuid} matches it"
        if len(self._by_uuid) >= MAX_DOMAINS:
            return f"a daemon holds at most {MAX_DOMAINS} domains"
        if live.name in self._by_name:
            return f"name {live.name!r} is already taken by uuid {self._by_name[live.name].uuid}"
        return ""

    def _reject(self, path: Path, problem: str) -> None:
        try:
            moved = self._files.reject(path)
        except OSError as exc:
            log.error("rejected %s: %s; cannot move it aside: %s", path, problem, exc)
            return
        log.warning("rejected %s: %s; moved aside to %s", path, problem, moved.name)


def _xml_names(folder: Path) -> list[str]:
    """The names of ``folder``'s ``*.xml`` entries, sorted (as strings: sorting paths costs
    more than reading the files)."""
    names = [n for n in os.listdir(folder) if n.endswith(".xml") and not n.startswith(".")]
    names.sort()
    return names


def _xml_files(folder: Path) -> list[Path]:
    """``folder``'s ``*.xml`` files in file-name order."""
    return [p for p in (folder / n for n in _xml_names(folder)) if p.is_file()]
