"""The one composition root: build every part from the settings and run the chosen roles.

`sealrelay serve` runs all roles in one process; `--roles` splits them across instances;
`--processes N` runs `Relay.prepare` once and N relays in forked processes (sealrelay/processes.py).
The web package is imported here, inside `_start_web`, so `gateway` never depends on `web` at
module level.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Awaitable, Callable, Collection, Coroutine
from datetime import datetime, timedelta
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from gateway.agent_logins import AgentLogins
from gateway.config import Settings
from gateway.console.admin import QueueDesk, UserDesk
from gateway.console.api_keys import ApiKeyDesk
from gateway.console.sessions import SessionDesk, delete_timed_out
from gateway.console.timeline import Timeline
from gateway.console.waiting import WaitingLetters
from gateway.fronts.milter import MilterFront
from gateway.fronts.smtp import SmtpFront
from gateway.intake.pipeline import Pipeline
from gateway.letters import letter_keys
from gateway.letters.desk import LetterDesk
from gateway.links.desk import LinkDesk
from gateway.login_throttle import LoginThrottle
from gateway.mail import dkim
from gateway.mail.loop_mark import LoopMarks, load_or_create_key
from gateway.mail.outgoing import Signer
from gateway.notices.desk import NoticeDesk
from gateway.outbound.delivery import DeliveryWorker
from gateway.outbound.queue_signal import QueueSignal
from gateway.outbound.routes import RouteTable
from gateway.outbound.upstream import Upstream
from gateway.store import health, journal, sweeper
from gateway.store.blob_columns import Horizon
from gateway.store.blobs import BlobStore, StoreUnavailable
from gateway.store.db import Database
from gateway.store.inline_blobs import InlineBlobStore
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import utcnow
from gateway.store.sequencer import Sequencer
from gateway.webhooks.desk import WebhookDesk
from gateway.webhooks.history import prune_finished
from gateway.webhooks.worker import WebhookWorker

if TYPE_CHECKING:  # the web (and aiohttp) are imported only by a relay with the web role
    from aiohttp import web

    from web.app import WebParts

log = logging.getLogger(__name__)

T = TypeVar("T")
ROLES = ("smtp", "web", "worker")
STARTUP_RETRY_FIRST = 0.5  # seconds; doubles up to database.connect_retry_max


def event_loop() -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """The event loop to run on, and its name for the log: uvloop's when it is installed
    (`pip install sealrelay[fast]`), which spends less CPU per connection and per read;
    asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        version = ".".join(map(str, sys.version_info[:3]))
        return asyncio.new_event_loop, f"asyncio (Python {version}; install uvloop for less CPU)"
    return uvloop.new_event_loop, f"uvloop {metadata.version('uvloop')}"


YOUNG_OBJECTS = 20_000  # new objects between the collector's passes; Python's default is 700


def _collector_for_serving() -> None:
    """Keep what the start-up made (the libraries, settings, mappers, templates: most of the
    objects the relay will ever hold) out of the garbage collector's full collections, and
    let the young generation grow to YOUNG_OBJECTS before it is collected.

    Each full collection walked all of them with the event loop stopped: 4 of about 57 ms in
    3,000 small messages, and the p99 time to 250 was 82 ms; frozen, those collections took
    at most 14 ms and the p99 was 47 ms (bench/README.md). Garbage left by the start-up is
    collected first, so nothing unreachable is kept for good.

    A message leaves no reference cycles behind (tests/fronts/test_session_lifetime.py), so
    the collector only has the odd cycle to find; at Python's 700 new objects it ran about
    200 times a second under load, and every pass moved the objects of the messages in
    flight to older generations, whose passes came to 5 ms every 1.4 s.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_OBJECTS, *gc.get_threshold()[1:])


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `event_loop()` chooses, saying which."""
    factory, name = event_loop()
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def load_signer(settings: Settings) -> Signer:
    return Signer(
        {
            domain: dkim.DkimKey.load(domain, entry.selector, entry.key_file)
            for domain, entry in settings.dkim.items()
        }
    )


def load_loop_marks(settings: Settings, clock: Callable[[], datetime] = utcnow) -> LoopMarks:
    """The loop mark's key from `loop.key_file`, made on first start (docs/microsoft-365.md)."""
    return LoopMarks(
        load_or_create_key(settings.loop.key_file),
        settings.server.hostname,
        timedelta(days=settings.loop.max_age_days),
        clock,
    )


def blob_store(settings: Settings, db: Database, files: BlobStore | None = None) -> BlobStore:
    """The blob store `[storage]` names, with the database's small blobs in front
    (gateway/store/inline_blobs.py): those are read from wherever blobs were kept, even with
    `inline_max_bytes` lowered since."""
    return InlineBlobStore(db, files or file_store(settings), settings.storage.inline_max_bytes)


def file_store(settings: Settings) -> BlobStore:
    """An S3 bucket for an s3:// url, else the local directory. The S3 store is imported
    only then: aiobotocore is the optional `s3` extra."""
    if settings.storage.bucket is None:
        return LocalBlobStore(settings.storage.path)
    try:
        from gateway.store.s3_blobs import s3_store
    except ImportError as exc:
        raise RuntimeError(
            f"storage.url {settings.storage.url} needs aiobotocore: pip install 'sealrelay[s3]'"
        ) from exc
    return s3_store(settings.storage)


def blob_horizon(settings: Settings, now: datetime) -> Horizon:
    """Which blobs the configured retention keeps at `now` (the sweep, verify --blobs)."""
    return Horizon(
        now,
        timedelta(days=settings.storage.blob_grace_days),
        settings.letter.evidence_retention,
        settings.storage.originals_kept(),
    )


def sweeper_for(
    settings: Settings,
    db: Database,
    blobs: BlobStore,
    letters: LetterDesk,
    notices: NoticeDesk | None = None,
) -> Callable[[datetime], Awaitable[sweeper.SweepReport]]:
    """The housekeeping round as configured: expiry warnings, links, letters, blobs (serve
    and the CLI)."""

    async def sweep(now: datetime) -> sweeper.SweepReport:
        if notices is not None:
            warned = await notices.expiry_warnings(now)
            if warned:
                log.info("sweep: %d letters about to expire, agents warned", warned)
        horizon = blob_horizon(settings, now)
        report = await sweeper.sweep(
            db,
            blobs,
            now,
            horizon.link_grace,
            evidence_years=horizon.evidence_years,
            originals=horizon.originals,
            expire_letters=letters.expire_due,
        )
        ended = await delete_timed_out(db, settings.console, now)
        if ended:
            log.info("sweep: %d timed-out console sessions deleted", ended)
        pruned = await prune_finished(db, now)
        if pruned:
            log.info("sweep: %d finished webhook deliveries older than 30 days deleted", pruned)
        return report

    return sweep


class Relay:
    def __init__(
        self,
        settings: Settings,
        *,
        roles: Collection[str] = ROLES,
        db: Database | None = None,
        blobs: BlobStore | None = None,
        upstream: Upstream | None = None,
        signer: Signer | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        self.settings = settings
        self.clock = clock
        self.roles = frozenset(roles)
        self.db = db or Database.connect(settings.database.url)
        # closed by whoever opened it: relays that share a database (tests, a supervisor's
        # checks) must not close it under each other
        self._owns_db = db is None
        files = blobs or file_store(settings)
        # every put or read of the store that fails marks the relay degraded at once
        self.blob_health = health.BlobHealth(files)
        self.blobs = blob_store(settings, self.db, self.blob_health.watched(files))
        self.signal = QueueSignal()
        self.loop = load_loop_marks(settings, clock)
        self.pipeline = Pipeline(settings, self.db, self.blobs, self.signal, clock, self.loop)
        self.links = LinkDesk(
            self.db,
            clock,
            scanners=settings.scanners.rules(),
            link_grace=timedelta(days=settings.storage.blob_grace_days),
        )
        self.letters = LetterDesk(settings, self.db, self.blobs, self.signal.notify, clock)
        # one count of failed logins for SMTP AUTH and the console's sign-in together
        self.login_throttle = LoginThrottle.from_settings(settings.smtp)
        self.smtp = SmtpFront(
            settings, self.db, self.pipeline, self.login_throttle, store=self.blob_health
        )
        # listens if [milter] listen
        self.milter = MilterFront(settings, self.db, self.pipeline, store=self.blob_health)
        self._sessions: SessionDesk | None = None
        self.agent_logins = AgentLogins.from_settings(settings, self.db, clock)
        self.worker = DeliveryWorker(
            settings,
            self.db,
            self.blobs,
            RouteTable.open(settings, default=upstream),
            signer or load_signer(settings),
            self.signal,
            clock,
            self.loop,
            logins=self.agent_logins,
        )
        self.webhooks = WebhookDesk(self.db, clock)
        # Its own task, own connections and own few slots: a slow receiver never holds mail.
        self.webhook_worker = WebhookWorker(
            settings, self.db, self.blobs, self.signal.notify, clock
        )
        self.notices = NoticeDesk(settings, self.db, self.blobs, self.signal.notify, clock)
        self.sweeper = sweeper_for(settings, self.db, self.blobs, self.letters, self.notices)
        # every process numbers and chains the journal's new events (the first pass also
        # those a crash left); closing the database drains it
        self.sequencer = Sequencer(self.db, settings.database.chain_interval)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._web_runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Start the roles; returns without starting them when stopped while waiting for the
        database."""
        if await self.prepare():
            await self.start_roles()

    async def prepare(self) -> bool:
        """The start-up work done once, before any process takes work: migrate (waiting for
        the database), clear interrupted blob writes, make the key files, report key problems.

        With `--processes N` the supervisor runs it in the parent before forking, so that no
        child removes another's blob write under way. False when stopped while waiting.
        """
        for problem in letter_keys.problems(self.settings):
            log.warning("%s: %s", "error" if problem.error else "warning", problem)
        if not await self._database_ready():
            return False
        await self._clear_interrupted_writes()
        if (unopenable := await self.agent_logins.key_problem()) is not None:
            log.error("agents' upstream logins: %s; their mail stays queued", unopenable)
        if "web" in self.roles:
            self.sessions()  # makes the installation key, if it is the first start
        return True

    async def _clear_interrupted_writes(self) -> None:
        """What killed writers left in the blob store; a store that cannot be reached does
        not stop the start: the relay runs degraded until it answers (BlobHealth), and the
        sweep clears the leftovers later."""
        with contextlib.suppress(StoreUnavailable):  # the watched store told BlobHealth
            await self.blobs.remove_interrupted_writes()

    async def start_roles(self, *, singletons: bool = True, reuse_port: bool = False) -> None:
        """Start this process's listeners and workers, after `prepare`.

        `singletons`: also the rounds that must not run in two processes at once (the sweeper,
        the notices round); with `--processes N` only process 0 runs them. The delivery and
        webhook workers run everywhere: their claims are leases (gateway/store/leases.py).
        `reuse_port`: bind with SO_REUSEPORT, so that every process listens on the same ports.
        """
        self.sequencer.start()
        # the listeners open knowing whether the store answers (up to CHECK_TIMEOUT)
        await self.blob_health.check()
        self._tasks.append(asyncio.create_task(self.blob_health.run(self._stop, checked=True)))
        if "worker" in self.roles:
            self._tasks.append(asyncio.create_task(self.worker.run(self._stop)))
            self._tasks.append(asyncio.create_task(self.webhook_worker.run(self._stop)))
            if singletons:
                self._tasks.append(asyncio.create_task(self.notices.run(self._stop)))
                self._tasks.append(
                    asyncio.create_task(
                        sweeper.run_hourly(
                            self.sweep_once, self._stop, self.settings.storage.sweep_interval
                        )
                    )
                )
        if "smtp" in self.roles:
            await self.smtp.start(reuse_port=reuse_port)
            await self.milter.start(reuse_port=reuse_port)
        if "web" in self.roles:
            self._web_runner = await self._start_web(reuse_port)

    async def _start_web(self, reuse_port: bool = False) -> web.AppRunner:
        from web.app import start_web

        return await start_web(self.web_parts(), reuse_port=reuse_port)

    def web_parts(self) -> WebParts:
        """What the web server is given: the desks, the blob store, the clock, the settings."""
        from web.app import WebParts

        db = self.db
        return WebParts(
            settings=self.settings,
            links=self.links,
            letters=self.letters,
            sessions=self.sessions(),
            blobs=self.blobs,
            clock=self.clock,
            health=lambda: health.database_answers(db),
            store_problem=lambda: self.blob_health.problem,
            queue_depths=lambda: health.queue_depths(db),
            journal_lag=lambda: health.journal_lag(db),
            roles=self.roles,
            timeline=Timeline(db),
            api_keys=ApiKeyDesk(db, self.clock),
            queue=QueueDesk(
                db,
                self.blobs,
                self.clock,
                timedelta(seconds=self.settings.upstream.queue_lifetime),
            ),
            users=UserDesk(db),
            webhooks=self.webhooks,
            waiting=WaitingLetters(db),
            agent_logins=self.agent_logins,
            chain=lambda: journal.verify_database(db),
        )

    def sessions(self) -> SessionDesk:
        """The console's session desk, made once: its pending sign-ins are signed with the
        installation key the web's forms use."""
        from web.csrf import installation_key

        if self._sessions is None:
            self._sessions = SessionDesk(
                self.db,
                self.settings.console,
                self.login_throttle,
                installation_key(self.settings),
                self.clock,
            )
        return self._sessions

    async def sweep_once(self) -> sweeper.SweepReport:
        """What the hourly sweep does, now (by this relay's clock)."""
        return await self.sweeper(self.clock())

    async def _database_ready(self) -> bool:
        """Migrate, retrying with backoff while the database cannot be reached.

        Orchestrators start the relay and its database together; exiting because PostgreSQL
        is a few seconds late turns a normal boot into a restart loop. False when a stop was
        requested first.
        """
        delay = STARTUP_RETRY_FIRST
        while not self._stop.is_set():
            try:
                await self.db.upgrade()
                return True
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                wait = min(delay, self.settings.database.connect_retry_max)
                log.warning("database not reachable (%s); retrying in %.1f s", _reason(exc), wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stop.wait()
            delay *= 2
        return False

    async def stop(self) -> None:
        """Stop taking mail first, then let workers finish their round."""
        await self.smtp.stop()
        await self.milter.stop()
        if self._web_runner is not None:
            await self._web_runner.cleanup()
        self._stop.set()
        self.signal.notify()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.worker.close()
        await self.blobs.close()
        if self._owns_db:
            await self.db.close()  # drains the group commit, then chains what is left
        else:
            await self.sequencer.close()  # its own: chains what is left
        log.info("sealrelay stopped")

    async def serve_forever(
        self,
        *,
        prepared: bool = False,
        singletons: bool = True,
        reuse_port: bool = False,
        ready: Callable[[], None] | None = None,
    ) -> None:
        """Prepare (unless the supervisor did), start, call `ready`, and wait for a stop."""
        if not prepared and not await self.prepare():
            return
        await self.start_roles(singletons=singletons, reuse_port=reuse_port)
        log.info(
            "sealrelay running: version %s, roles %s",
            metadata.version("sealrelay"),
            ", ".join(sorted(self.roles)),
        )
        _collector_for_serving()
        if ready is not None:
            ready()
        await self._stop.wait()

    def request_stop(self, reason: str = "") -> None:
        if reason and not self._stop.is_set():
            log.info("sealrelay stopping on %s", reason)
        self._stop.set()
        self.signal.notify()


def _reason(exc: BaseException) -> str:
    """One line: SQLAlchemy appends SQL and a link to its own text."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
