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
    DateTime,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from esb.errors import OdbUnavailable

logger = logging.getLogger(__name__)

MODULE = "module"
UNIT = "unit"


LAST_GOOD = "last_good"


class Base(DeclarativeBase):
    pass


class Deployment(Base):
    """One version of one deployed thing: a service module or a definition unit."""

    __tablename__ = "esb_deployment"
    __table_args__ = (UniqueConstraint("kind", "name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    version: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    is_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Mark(Base):
    """A named number the cluster keeps, such as the last good generation."""

    __tablename__ = "esb_mark"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Crash(Base):
    """A worker that died while importing one deployment (a module version)."""

    __tablename__ = "esb_crash"
    __table_args__ = (UniqueConstraint("deployment_id", "host", "pid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Rejection(Base):
    """A deployment the server took back by itself, and the generations it went between."""

    __tablename__ = "esb_rejection"

    deployment_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    version: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    from_generation: Mapped[int] = mapped_column(Integer)
    to_generation: Mapped[int] = mapped_column(Integer)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


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
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot create the ODB schema: {exc}") from exc

    def generation(self) -> int:
        """The id of the newest change, 0 for an empty ODB."""
        try:
            with Session(self.engine) as session:
                return session.scalar(select(func.max(Deployment.id))) or 0
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc

    def current(self, kind: str, *, at: int | None = None) -> list[Current]:
        """The newest version of every live name of that kind, ordered by name.

        With AT, the state at generation AT: only rows with an id up to AT count.
        """
        newest = select(Deployment.name, func.max(Deployment.version).label("version")).where(
            Deployment.kind == kind
        )
        if at is not None:
            newest = newest.where(Deployment.id <= at)
        newest = newest.group_by(Deployment.name).subquery()
        query = (
            select(Deployment)
            .join(
                newest,
                (Deployment.name == newest.c.name) & (Deployment.version == newest.c.version),
            )
            .where(Deployment.kind == kind, Deployment.is_deleted.is_(False))
            .order_by(Deployment.name)
        )
        try:
            with Session(self.engine) as session:
                return [
                    Current(row.kind, row.name, row.version, row.content, row.id)
                    for row in session.scalars(query)
                ]
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc

    def put(self, kind: str, name: str, content: str, *, is_deleted: bool = False) -> int:
        """Store a new version of NAME and return its version number."""
        for _attempt in range(5):
            try:
                with Session(self.engine) as session, session.begin():
                    latest = session.scalar(
                        select(func.max(Deployment.version)).where(
                            Deployment.kind == kind, Deployment.name == name
                        )
                    )
                    version = (latest or 0) + 1
                    session.add(
                        Deployment(
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
            with Session(self.engine) as session:
                mark = session.get(Mark, LAST_GOOD)
                return mark.value if mark is not None else 0
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc

    def set_last_good(self, generation: int) -> bool:
        """Raise the last good generation to GENERATION (never lower it); True if it moved."""
        try:
            with Session(self.engine) as session, session.begin():
                mark = session.get(Mark, LAST_GOOD, with_for_update=True)
                now = dt.datetime.now(dt.UTC)
                if mark is None:
                    session.add(Mark(name=LAST_GOOD, value=generation, updated_at=now))
                    return True
                if mark.value >= generation:
                    return False
                mark.value, mark.updated_at = generation, now
                return True
        except IntegrityError:
            return False  # another worker recorded it at the same moment
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write the ODB: {exc}") from exc

    def record_crash(self, deployment_id: int, host: str, pid: int) -> int:
        """Record that worker HOST:PID died importing DEPLOYMENT_ID; the number of such deaths."""
        try:
            with Session(self.engine) as session:
                with session.begin():
                    exists = session.scalar(
                        select(func.count(Crash.id)).where(
                            Crash.deployment_id == deployment_id, Crash.host == host, Crash.pid == pid
                        )
                    )
                    if not exists:
                        session.add(
                            Crash(deployment_id=deployment_id, host=host, pid=pid, at=dt.datetime.now(dt.UTC))
                        )
                return session.scalar(
                    select(func.count(Crash.id)).where(Crash.deployment_id == deployment_id)
                ) or 0
        except IntegrityError:
            return self.record_crash(deployment_id, host, pid)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write the ODB: {exc}") from exc

    def roll_back(self, deployment_id: int, reason: str) -> int | None:
        """Take DEPLOYMENT_ID back: record it rejected and restore, as new versions, every name
        that changed since the last good generation (or since just before DEPLOYMENT_ID when
        that is older). One transaction; the new generation, or None if another process
        rolled it back first."""
        try:
            with Session(self.engine) as session, session.begin():
                bad = session.get(Deployment, deployment_id)
                if bad is None or session.get(Rejection, deployment_id) is not None:
                    return None
                mark = session.get(Mark, LAST_GOOD)
                good = deployment_id - 1
                if mark is not None and 0 < mark.value < deployment_id:
                    good = mark.value
                latest = session.scalar(select(func.max(Deployment.id))) or 0
                now = dt.datetime.now(dt.UTC)
                session.add(
                    Rejection(
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
                session.flush()  # the rejection row claims the rollback before anything else
                for kind in (MODULE, UNIT):
                    then = {c.name: c for c in self._state(session, kind, good)}
                    for name, row in self._newest_rows(session, kind).items():
                        was = then.get(name)
                        if was is not None and not row.is_deleted and row.id == was.deployment_id:
                            continue
                        if was is None and row.is_deleted:
                            continue
                        session.add(
                            Deployment(
                                kind=kind,
                                name=name,
                                version=row.version + 1,
                                content=was.content if was is not None else "",
                                is_deleted=was is None,
                                created_at=now,
                            )
                        )
                session.flush()
                generation = session.scalar(select(func.max(Deployment.id))) or 0
            return generation
        except IntegrityError:
            return None  # rolled back concurrently by another worker
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write the ODB: {exc}") from exc

    def rejections(self, limit: int = 20) -> list[RejectedDeployment]:
        """The newest rollbacks first."""
        try:
            with Session(self.engine) as session:
                query = select(Rejection).order_by(Rejection.deployment_id.desc()).limit(limit)
                rows = session.scalars(query)
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
                    for r in rows
                ]
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc

    def open_rejections(self) -> list[RejectedDeployment]:
        """The rollbacks whose name was not deployed (nor undeployed) since: each is still
        a problem for status, until the operator deploys a fixed version or removes it."""
        try:
            with Session(self.engine) as session:
                open_ids = []
                newest = select(Rejection).order_by(Rejection.deployment_id.desc()).limit(20)
                for r in session.scalars(newest):
                    since = session.scalar(
                        select(func.max(Deployment.created_at)).where(
                            Deployment.kind == r.kind, Deployment.name == r.name
                        )
                    )
                    # The rollback's own rows carry the rejection's moment exactly.
                    if since is None or since <= r.at:
                        open_ids.append(r.deployment_id)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc
        return [r for r in self.rejections() if r.deployment_id in open_ids]

    def generation_created_at(self) -> dt.datetime | None:
        """When the newest change was written (UTC), None for an empty ODB."""
        try:
            with Session(self.engine) as session:
                moment = session.scalar(select(Deployment.created_at).order_by(Deployment.id.desc()).limit(1))
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the ODB: {exc}") from exc
        if moment is not None and moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)  # SQLite keeps no zone; esb writes UTC
        return moment

    def _newest_rows(self, session: Session, kind: str) -> dict[str, Deployment]:
        rows: dict[str, Deployment] = {}
        query = select(Deployment).where(Deployment.kind == kind).order_by(Deployment.version)
        for row in session.scalars(query):
            rows[row.name] = row
        return rows

    def _state(self, session: Session, kind: str, at: int) -> list[Current]:
        rows: dict[str, Deployment] = {}
        query = (
            select(Deployment)
            .where(Deployment.kind == kind, Deployment.id <= at)
            .order_by(Deployment.version)
        )
        for row in session.scalars(query):
            rows[row.name] = row
        return [
            Current(r.kind, r.name, r.version, r.content, r.id) for r in rows.values() if not r.is_deleted
        ]

    def dispose(self) -> None:
        self.engine.dispose()
