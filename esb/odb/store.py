"""The ODB: the durable truth of a cluster, every deployed module and definition unit, versioned.

One table holds every deployment; a row's id orders all changes, so the highest id is the
cluster's generation, which workers compare to know whether to rebuild. The state at any
generation G is the newest version of each name among the rows with id <= G, which is how
a worker rebuilds the last good generation.

Beside it: ``esb_mark`` holds the last good generation (the newest one every live worker
applied), ``esb_crash`` the workers that died while importing a module version, and
``esb_rejection`` the versions the server rolled back from, with the reason.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from esb.errors import OdbUnavailable

logger = logging.getLogger(__name__)

MODULE = "module"
UNIT = "unit"


LAST_GOOD = "last_good"

# PERF(esb): SQLAlchemy Core tables, not ORM classes. Every process that reads the ODB
# (arbiter, workers, scheduler, deploy processes) imported sqlalchemy.orm for these four
# tables alone: 5.6 MB of RSS each, about 22 MB of an idle 2-worker server (memory an idle server keeps).
# The DDL is the one the ORM classes made (tests/unit/test_odb_schema.py).
METADATA = MetaData()

#: One version of one deployed thing: a service module or a definition unit.
deployment = Table(
    "esb_deployment",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(255), nullable=False),
    Column("version", Integer, nullable=False),
    Column("content", Text, nullable=False),
    Column("is_deleted", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("kind", "name", "version"),
)

#: A named number the cluster keeps, such as the last good generation.
mark = Table(
    "esb_mark",
    METADATA,
    Column("name", String(64), primary_key=True),
    Column("value", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: A worker that died while importing one deployment (a module version).
crash = Table(
    "esb_crash",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("deployment_id", Integer, nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("deployment_id", "host", "pid"),
)

#: A deployment the server took back by itself, and the generations it went between.
rejection = Table(
    "esb_rejection",
    METADATA,
    Column("deployment_id", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),
    Column("name", String(255), nullable=False),
    Column("version", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("from_generation", Integer, nullable=False),
    Column("to_generation", Integer, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class RejectedDeployment:
    """A module version or unit the server rolled back from (a fact status shows)."""

    deployment_id: int
    kind: str
    name: str
    version: int
    reason: str
    from_generation: int
    to_generation: int
    at: str


@dataclass(frozen=True)
class Current:
    """The live version of one module or unit."""

    kind: str
    name: str
    version: int
    content: str
    # The row's id: the generation that introduced this version.
    deployment_id: int = 0


def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    # WAL lets every worker read while a deploy writes; the busy timeout waits out a writer.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class OdbStore:
    """Reads and writes deployments; every driver error leaves as OdbUnavailable."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            self.engine: Engine = create_engine(url, connect_args={"timeout": 10})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True, pool_timeout=10)

    def create_schema(self) -> None:
        try:
            METADATA.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot create the ODB schema: {exc}") from exc

    def generation(self) -> int:
        """The id of the newest change, 0 for an empty ODB."""
        try:
            with self.engine.connect() as conn:
                return conn.scalar(select(func.max(deployment.c.id))) or 0
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc

    def current(self, kind: str, *, at: int | None = None) -> list[Current]:
        """The newest version of every live name of that kind, ordered by name.

        With AT, the state at generation AT: only rows with an id up to AT count.
        """
        d = deployment.c
        newest = select(d.name, func.max(d.version).label("version")).where(d.kind == kind)
        if at is not None:
            newest = newest.where(d.id <= at)
        newest = newest.group_by(d.name).subquery()
        query = (
            select(d.kind, d.name, d.version, d.content, d.id)
            .join(newest, (d.name == newest.c.name) & (d.version == newest.c.version))
            .where(d.kind == kind, d.is_deleted.is_(False))
            .order_by(d.name)
        )
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query)
                return [Current(row.kind, row.name, row.version, row.content, row.id) for row in rows]
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc

    def put(self, kind: str, name: str, content: str, *, is_deleted: bool = False) -> int:
        """Store a new version of NAME and return its version number."""
        d = deployment.c
        for _attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    latest = conn.scalar(select(func.max(d.version)).where(d.kind == kind, d.name == name))
                    version = (latest or 0) + 1
                    conn.execute(
                        insert(deployment).values(
                            kind=kind,
                            name=name,
                            version=version,
                            content=content,
                            is_deleted=is_deleted,
                            created_at=dt.datetime.now(dt.UTC),
                        )
                    )
                return version
            except IntegrityError:
                # Another deployer took this version number first; take the next one.
                continue
            except SQLAlchemyError as exc:
                raise OdbUnavailable(f"cannot write the ODB: {exc}") from exc
        raise OdbUnavailable(f"could not store {kind} {name}: too many concurrent deploys")

    # -- the last good generation, crashes and rollbacks ------------------------------

    def last_good(self) -> int:
        """The newest generation every live worker applied; 0 when none was recorded yet."""
        try:
            with self.engine.connect() as conn:
                return conn.scalar(select(mark.c.value).where(mark.c.name == LAST_GOOD)) or 0
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc

    def set_last_good(self, generation: int) -> bool:
        """Raise the last good generation to GENERATION (never lower it); True if it moved."""
        try:
            with self.engine.begin() as conn:
                value = conn.scalar(select(mark.c.value).where(mark.c.name == LAST_GOOD).with_for_update())
                now = dt.datetime.now(dt.UTC)
                if value is None:
                    conn.execute(insert(mark).values(name=LAST_GOOD, value=generation, updated_at=now))
                    return True
                if value >= generation:
                    return False
                raised = update(mark).where(mark.c.name == LAST_GOOD).values(value=generation, updated_at=now)
                conn.execute(raised)
                return True
        except IntegrityError:
            return False  # another worker recorded it at the same moment
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write the ODB: {exc}") from exc

    def record_crash(self, deployment_id: int, host: str, pid: int) -> int:
        """Record that worker HOST:PID died importing DEPLOYMENT_ID; the number of such deaths."""
        c = crash.c
        try:
            with self.engine.connect() as conn:
                with conn.begin():
                    this_one = (c.deployment_id == deployment_id, c.host == host, c.pid == pid)
                    exists = conn.scalar(select(func.count(c.id)).where(*this_one))
                    if not exists:
                        conn.execute(
                            insert(crash).values(deployment_id=deployment_id, host=host, pid=pid,
                                                 at=dt.datetime.now(dt.UTC))
                        )
                return conn.scalar(select(func.count(c.id)).where(c.deployment_id == deployment_id)) or 0
        except IntegrityError:
            return self.record_crash(deployment_id, host, pid)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write the ODB: {exc}") from exc

    def roll_back(self, deployment_id: int, reason: str) -> int | None:
        """Take DEPLOYMENT_ID back: record it rejected and restore, as new versions, every name
        that changed since the last good generation (or since just before DEPLOYMENT_ID when
        that is older). One transaction; the new generation, or None if another process
        rolled it back first."""
        d = deployment.c
        try:
            with self.engine.begin() as conn:
                bad = conn.execute(select(deployment).where(d.id == deployment_id)).first()
                r = rejection.c
                rejected = conn.scalar(select(r.deployment_id).where(r.deployment_id == deployment_id))
                if bad is None or rejected is not None:
                    return None
                last_good = conn.scalar(select(mark.c.value).where(mark.c.name == LAST_GOOD))
                good = deployment_id - 1
                if last_good is not None and 0 < last_good < deployment_id:
                    good = last_good
                latest = conn.scalar(select(func.max(d.id))) or 0
                now = dt.datetime.now(dt.UTC)
                # The rejection row claims the rollback before anything else (its key is unique).
                conn.execute(
                    insert(rejection).values(
                        deployment_id=deployment_id,
                        kind=bad.kind,
                        name=bad.name,
                        version=bad.version,
                        reason=reason,
                        from_generation=latest,
                        to_generation=good,
                        at=now,
                    )
                )
                for kind in (MODULE, UNIT):
                    then = {c.name: c for c in self._state(conn, kind, good)}
                    for name, row in self._newest_rows(conn, kind).items():
                        was = then.get(name)
                        if was is not None and not row.is_deleted and row.id == was.deployment_id:
                            continue
                        if was is None and row.is_deleted:
                            continue
                        conn.execute(
                            insert(deployment).values(
                                kind=kind,
                                name=name,
                                version=row.version + 1,
                                content=was.content if was is not None else "",
                                is_deleted=was is None,
                                created_at=now,
                            )
                        )
                generation = conn.scalar(select(func.max(d.id))) or 0
            return generation
        except IntegrityError:
            return None  # rolled back concurrently by another worker
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write the ODB: {exc}") from exc

    def rejections(self, limit: int = 20) -> list[RejectedDeployment]:
        """The newest rollbacks first."""
        try:
            with self.engine.connect() as conn:
                query = select(rejection).order_by(rejection.c.deployment_id.desc()).limit(limit)
                return [
                    RejectedDeployment(
                        r.deployment_id,
                        r.kind,
                        r.name,
                        r.version,
                        r.reason,
                        r.from_generation,
                        r.to_generation,
                        r.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    )
                    for r in conn.execute(query)
                ]
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc

    def open_rejections(self) -> list[RejectedDeployment]:
        """The rollbacks whose name was not deployed (nor undeployed) since: each is still
        a problem for status, until the operator deploys a fixed version or removes it."""
        d = deployment.c
        try:
            with self.engine.connect() as conn:
                open_ids = []
                newest = select(rejection).order_by(rejection.c.deployment_id.desc()).limit(20)
                for r in conn.execute(newest).all():
                    same_name = (d.kind == r.kind, d.name == r.name)
                    since = conn.scalar(select(func.max(d.created_at)).where(*same_name))
                    # The rollback's own rows carry the rejection's moment exactly.
                    if since is None or since <= r.at:
                        open_ids.append(r.deployment_id)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc
        return [r for r in self.rejections() if r.deployment_id in open_ids]

    def generation_created_at(self) -> dt.datetime | None:
        """When the newest change was written (UTC), None for an empty ODB."""
        d = deployment.c
        try:
            with self.engine.connect() as conn:
                moment = conn.scalar(select(d.created_at).order_by(d.id.desc()).limit(1))
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc
        if moment is not None and moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)  # SQLite keeps no zone; esb writes UTC
        return moment

    def _newest_rows(self, conn: Connection, kind: str) -> dict[str, Row]:
        rows: dict[str, Row] = {}
        query = select(deployment).where(deployment.c.kind == kind).order_by(deployment.c.version)
        for row in conn.execute(query):
            rows[row.name] = row
        return rows

    def _state(self, conn: Connection, kind: str, at: int) -> list[Current]:
        d = deployment.c
        rows: dict[str, Row] = {}
        for row in conn.execute(select(deployment).where(d.kind == kind, d.id <= at).order_by(d.version)):
            rows[row.name] = row
        return [
            Current(r.kind, r.name, r.version, r.content, r.id) for r in rows.values() if not r.is_deleted
        ]

    def dispose(self) -> None:
        self.engine.dispose()
