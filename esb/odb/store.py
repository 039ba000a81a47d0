"""The ODB: the durable truth of a cluster, every deployed module and definition unit, versioned.

One table holds every deployment; a row's id orders all changes, so the highest id is the
cluster's generation, which workers compare to know whether to rebuild.
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


@dataclass(frozen=True)
class Current:
    """The live version of one module or unit."""

    kind: str
    name: str
    version: int
    content: str


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

    def current(self, kind: str) -> list[Current]:
        """The newest version of every live name of that kind, ordered by name."""
        newest = (
            select(Deployment.name, func.max(Deployment.version).label("version"))
            .where(Deployment.kind == kind)
            .group_by(Deployment.name)
            .subquery()
        )
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
                    Current(row.kind, row.name, row.version, row.content) for row in session.scalars(query)
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

    def dispose(self) -> None:
        self.engine.dispose()
