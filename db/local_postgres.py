"""A throwaway local PostgreSQL server for tests, CI and trying batchlab on many workers.

One command starts a private cluster in a directory and prints its storage URL::

    python -m db.local_postgres start --dir /tmp/batchlab-pg      # prints the URL
    export BATCHLAB_STORAGE=$(python -m db.local_postgres url --dir /tmp/batchlab-pg)
    python -m db.local_postgres restart --dir /tmp/batchlab-pg
    python -m db.local_postgres stop --dir /tmp/batchlab-pg --remove

From Python::

    with LocalPostgres() as server:          # a fresh temporary directory, removed at exit
        engine = sqlalchemy.create_engine(server.url)
        server.restart()                     # severs open connections, keeps the data

What it does: finds the PostgreSQL server binaries (``BATCHLAB_PG_BIN``, then ``PATH``,
then Debian's ``/usr/lib/postgresql/<version>/bin``), runs ``initdb`` in ``DIR/data`` as
a normal user (PostgreSQL refuses to run as root: as root it uses the ``postgres`` user
of the Debian package, or creates a system user ``batchlab``, and runs the tools through
``runuser``), listens on 127.0.0.1 only, on a free port, and creates the database
``batchlab`` owned by the superuser ``batchlab``.

This is a *throwaway* server, not a deployment:
- authentication is ``trust`` for local connections (anyone on this machine who can
  reach 127.0.0.1 can connect as any user, with no password);
- ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are off, for test speed: a
  clean stop or restart keeps every committed row, but a power loss or OS crash may
  corrupt the cluster.
For a shared, durable server use a managed or properly configured PostgreSQL and point
``--storage`` / ``BATCHLAB_STORAGE`` at it.

Standard library only: ``db`` never imports torch, and this module needs no driver.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install PostgreSQL: apt-get install -y postgresql"
DEFAULT_DATABASE = "batchlab"
DEFAULT_SUPERUSER = "batchlab"
# 32+ workers, each with a small SQLAlchemy pool (5 + overflow), plus the dashboard
# and ad-hoc psql sessions; the memory cost of a connection slot is small.
DEFAULT_MAX_CONNECTIONS = 300
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "batchlab-postgres")
# Debian's packaged server user; otherwise we create this one (as root only).
DEBIAN_SERVER_USER = "postgres"
FALLBACK_SERVER_USER = "batchlab"

STATE_FILE = "local_postgres.json"
LOG_FILE = "postgres.log"
DATA_SUBDIR = "data"
CONF_FILE = "batchlab.conf"  # our settings, included from postgresql.conf
# sun_path is 108 bytes on Linux; the socket file name is ".s.PGSQL.<port>".
MAX_SOCKET_DIR_LENGTH = 107 - len("/.s.PGSQL.65535")
PG_CTL_TIMEOUT_SECONDS = 60
START_ATTEMPTS = 3  # a port picked as free can be taken before the server binds it


class LocalPostgresError(RuntimeError):
    """A one-line, user-facing reason why the throwaway server could not be used."""


@dataclass(frozen=True)
class PostgresBinaries:
    """Paths of the server tools of one PostgreSQL installation."""

    bin_dir: Path

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def version(self) -> str:
        """Major version, from Debian's directory name or from ``pg_ctl --version``."""
        debian = re.fullmatch(r"\d+", self.bin_dir.parent.name)
        if debian and self.bin_dir.name == "bin":
            return debian.group(0)
        out = subprocess.run(
            [self.tool("pg_ctl"), "--version"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"(\d+)", out)
        return match.group(1) if match else "unknown"


_REQUIRED_TOOLS = ("initdb", "pg_ctl", "postgres", "createdb")


def _has_tools(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / tool, os.X_OK) for tool in _REQUIRED_TOOLS)


def _version_key(path: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", Path(path).parent.name)
    return tuple(int(n) for n in numbers) or (0,)


def find_binaries(
    version: str | None = None,
    search_globs: tuple[str, ...] = ("/usr/lib/postgresql/*/bin",),
    use_path: bool = True,
) -> PostgresBinaries:
    """Locate initdb/pg_ctl/postgres/createdb; prefer ``version`` when given.

    Order: ``$BATCHLAB_PG_BIN``, then ``PATH``, then the newest Debian install (the one
    matching ``version`` first, so an existing data directory is opened by its own
    major version). Raises LocalPostgresError with an install hint when none is found.
    """
    candidates: list[Path] = []
    override = os.environ.get("BATCHLAB_PG_BIN")
    if override:
        if not _has_tools(Path(override)):
            raise LocalPostgresError(
                f"BATCHLAB_PG_BIN={override} lacks one of {', '.join(_REQUIRED_TOOLS)}"
            )
        return PostgresBinaries(Path(override))
    debian_dirs: list[str] = []
    for pattern in search_globs:
        debian_dirs.extend(glob.glob(pattern))
    debian_dirs.sort(key=_version_key, reverse=True)
    if version is not None:
        debian_dirs.sort(key=lambda d: Path(d).parent.name != version)
        candidates.extend(Path(d) for d in debian_dirs)
    if use_path:
        initdb = shutil.which("initdb")
        if initdb:
            candidates.append(Path(os.path.realpath(initdb)).parent)
    if version is None:
        candidates.extend(Path(d) for d in debian_dirs)
    for bin_dir in candidates:
        if _has_tools(bin_dir):
            return PostgresBinaries(bin_dir)
    raise LocalPostgresError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}"
    )


def postgres_available() -> bool:
    """True when the server binaries are installed (for skipping tests cleanly)."""
    try:
        find_binaries()
    except LocalPostgresError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ensure_server_user() -> str:
    """The OS user that owns and runs the cluster when we are root."""
    for name in (DEBIAN_SERVER_USER, FALLBACK_SERVER_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    useradd = shutil.which("useradd")
    if not useradd:
        raise LocalPostgresError(
            "running as root needs a non-root user for PostgreSQL; create one "
            f"(useradd --system {FALLBACK_SERVER_USER}) or run as a normal user"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         FALLBACK_SERVER_USER],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )
    return FALLBACK_SERVER_USER


def _as_user_prefix(user: str | None) -> list[str]:
    """Command prefix that runs a tool as ``user`` (empty when we are that user)."""
    if user is None:
        return []
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", user, "--"]
    # util-linux's runuser is on every Debian system; su would need a shell command
    # line (quoting), so other systems are asked for runuser or a non-root user instead.
    raise LocalPostgresError("running as root needs runuser (util-linux) to drop privileges")


class LocalPostgres:
    """A private PostgreSQL cluster in ``directory``; a context manager.

    ``directory`` None: a fresh temporary directory, removed on stop (``remove``
    defaults to True then). An existing cluster in ``directory`` is reused: its data,
    port and settings survive stop/start, which is what ``restart()`` relies on.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        database: str = DEFAULT_DATABASE,
        remove: bool | None = None,
    ) -> None:
        self._temporary = directory is None
        self.directory = Path(directory).absolute() if directory is not None else None
        self.requested_port = port
        self.max_connections = max_connections
        self.database = database
        self.remove = self._temporary if remove is None else remove
        self.superuser = DEFAULT_SUPERUSER
        self.port: int | None = None
        self._binaries: PostgresBinaries | None = None
        self._os_user: str | None = None
        self._load_state()

    # ----- paths and state -----
    @property
    def data_dir(self) -> Path:
        return self._require_dir() / DATA_SUBDIR

    @property
    def log_file(self) -> Path:
        return self._require_dir() / LOG_FILE

    def _require_dir(self) -> Path:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="batchlab-pg-"))
        return self.directory

    def _state_path(self) -> Path:
        return self._require_dir() / STATE_FILE

    def _load_state(self) -> None:
        if self.directory is None:
            return
        path = self.directory / STATE_FILE
        if not path.exists():
            return
        state = json.loads(path.read_text())
        self.port = int(state["port"])
        self.superuser = state.get("superuser", DEFAULT_SUPERUSER)
        self.database = state.get("database", self.database)

    def _save_state(self) -> None:
        state = {"port": self.port, "superuser": self.superuser, "database": self.database,
                 "bin_dir": str(self.binaries.bin_dir)}
        self._state_path().write_text(json.dumps(state, indent=2) + "\n")

    # ----- URLs -----
    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``batchlab`` database (psycopg 3 driver, no password)."""
        return self.url_for(self.database)

    @property
    def libpq_url(self) -> str:
        """The same database as a libpq URI, for psql and plain psycopg."""
        return f"postgresql://{self.superuser}@127.0.0.1:{self._require_port()}/{self.database}"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.superuser}@127.0.0.1:{self._require_port()}/{database}"

    def _require_port(self) -> int:
        if self.port is None:
            raise LocalPostgresError(f"no local PostgreSQL in {self.directory}; start it first")
        return self.port

    # ----- running tools -----
    @property
    def binaries(self) -> PostgresBinaries:
        if self._binaries is None:
            version_file = self.data_dir / "PG_VERSION" if self.directory else None
            version = None
            if version_file is not None and version_file.exists():
                version = version_file.read_text().strip()
            self._binaries = find_binaries(version)
        return self._binaries

    @property
    def os_user(self) -> str | None:
        """The user that runs the server; None means the current (non-root) user."""
        if os.geteuid() != 0:
            return None
        if self._os_user is None:
            self._os_user = _ensure_server_user()
        return self._os_user

    def _run(self, args: list[str], *, as_server_user: bool = True,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = _as_user_prefix(self.os_user) if as_server_user else []
        # cwd: the server user may not be able to enter the caller's directory (/root).
        # stdin closed: CI has none, and no tool here should ever prompt.
        result = subprocess.run(
            prefix + args, cwd=self._require_dir(), capture_output=True, text=True,
            stdin=subprocess.DEVNULL, check=False,
            env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"},
        )
        if check and result.returncode != 0:
            raise LocalPostgresError(
                f"{Path(args[0]).name} failed ({result.returncode}): {_last_line(result)}"
            )
        return result

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([self.binaries.tool("pg_ctl"), "-D", str(self.data_dir), *args],
                         check=check)

    # ----- lifecycle -----
    def is_running(self) -> bool:
        if self.directory is None or not (self.data_dir / "PG_VERSION").exists():
            return False
        return self._pg_ctl("status", check=False).returncode == 0

    def start(self) -> str:
        """Initialise (first time), start, create the database; returns ``self.url``."""
        self.binaries  # fail early, with the install hint, before touching anything
        directory = self._require_dir()
        directory.mkdir(parents=True, exist_ok=True)
        if self.is_running():
            return self.url
        self._give_to_server_user(directory)
        created = not (self.data_dir / "PG_VERSION").exists()
        if created:
            self._initdb()
        self._start_on_a_free_port()
        self._create_database(self.database)
        return self.url

    def stop(self, remove: bool | None = None) -> None:
        """Stop (fast: roll back open transactions, checkpoint); optionally delete all."""
        remove = self.remove if remove is None else remove
        if self.is_running():
            result = self._pg_ctl("stop", "-m", "fast", "-w", "-t",
                                  str(PG_CTL_TIMEOUT_SECONDS), check=False)
            if result.returncode != 0 and self.is_running():
                raise LocalPostgresError(f"pg_ctl stop failed: {_last_line(result)}")
        if remove and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def restart(self) -> None:
        """Stop fast and start again on the same port; committed data survives."""
        self._pg_ctl("restart", "-m", "fast", "-w", "-t", str(PG_CTL_TIMEOUT_SECONDS),
                     "-l", str(self.log_file), check=False)
        if not self.is_running():
            raise LocalPostgresError(
                f"PostgreSQL did not restart (see {self.log_file}): {self._log_tail()}"
            )

    def create_database(self, name: str) -> str:
        """Create another database on this server (idempotent); returns its SQLAlchemy URL.

        Tests that must not see each other's tables each take their own database.
        """
        self._create_database(name)
        return self.url_for(name)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----- steps -----
    def _give_to_server_user(self, directory: Path) -> None:
        user = self.os_user
        if user is None:
            return
        entry = pwd.getpwnam(user)
        for path in [directory, *directory.rglob("*")]:
            os.lchown(path, entry.pw_uid, entry.pw_gid)
        probe = self._run(["test", "-w", str(directory), "-a", "-x", str(directory)],
                          check=False)
        if probe.returncode != 0:
            raise LocalPostgresError(
                f"user {user}, which runs PostgreSQL, cannot reach {directory}: a parent "
                f"directory is private to root; use another --dir, e.g. {DEFAULT_DIR}"
            )

    def _initdb(self) -> None:
        # --no-sync: the cluster is throwaway. --locale=C: no dependency on the locales
        # installed (slim images have none); UTF8 so any text round-trips.
        self._run([
            self.binaries.tool("initdb"), "-D", str(self.data_dir),
            "--username", self.superuser, "--auth", "trust",
            "--encoding", "UTF8", "--locale", "C", "--no-sync",
        ])
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as handle:
            handle.write(f"\ninclude = '{CONF_FILE}'  # batchlab's throwaway settings\n")

    def _write_settings(self, port: int) -> None:
        directory = str(self._require_dir())
        # A socket next to the data lets `psql -h DIR` work; too long a path cannot be
        # a socket, and then the server is reachable over TCP only.
        socket_dir = directory if len(directory) <= MAX_SOCKET_DIR_LENGTH else ""
        settings = {
            "listen_addresses": "'127.0.0.1'",  # never reachable from other machines
            "port": str(port),
            "unix_socket_directories": f"'{socket_dir}'",
            "max_connections": str(self.max_connections),
            # Throwaway cluster: trade crash safety for speed (a clean stop or
            # restart still keeps every committed row).
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        path = self.data_dir / CONF_FILE
        path.write_text(text)
        user = self.os_user
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _start_on_a_free_port(self) -> None:
        # An explicit --port is a promise: fail if it is taken. A remembered port (from
        # an earlier start) or a picked one can be lost to another process: pick again.
        port = self.requested_port or self.port or free_port()
        for _ in range(START_ATTEMPTS):
            self._write_settings(port)
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            result = self._pg_ctl("start", "-w", "-t", str(PG_CTL_TIMEOUT_SECONDS),
                                  "-l", str(self.log_file), check=False)
            if result.returncode == 0 and self.is_running():
                self.port = port
                self._save_state()
                return
            port_taken = "Address already in use" in self._log_text(log_offset)
            if port_taken and self.requested_port:
                raise LocalPostgresError(f"port {port} on 127.0.0.1 is already in use")
            if not port_taken:
                raise LocalPostgresError(
                    f"PostgreSQL did not start on port {port} (see {self.log_file}): "
                    f"{self._log_tail()}"
                )
            port = free_port()
        raise LocalPostgresError(f"PostgreSQL found no free port (see {self.log_file})")

    def _create_database(self, name: str) -> None:
        result = self._run([
            self.binaries.tool("createdb"), "-h", "127.0.0.1", "-p", str(self._require_port()),
            "-U", self.superuser, name,
        ], as_server_user=False, check=False)
        if result.returncode != 0 and "already exists" not in result.stderr:
            raise LocalPostgresError(f"createdb {name} failed: {_last_line(result)}")

    def _log_text(self, offset: int = 0) -> str:
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_file.read_text(errors="replace").splitlines()
                     if ln.strip()]
        except OSError:
            return "no log written"
        interesting = [ln for ln in lines if "FATAL" in ln or "ERROR" in ln]
        return (interesting or lines or ["empty log"])[-1].strip()


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


# ----- CLI -----
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m db.local_postgres",
        description="A throwaway local PostgreSQL (trust auth on 127.0.0.1, fsync off) "
                    "for tests and multi-worker trials; prints its SQLAlchemy URL.",
    )
    parser.add_argument("command", choices=["start", "stop", "restart", "url", "status"])
    parser.add_argument("--dir", default=os.environ.get("BATCHLAB_POSTGRES_DIR", DEFAULT_DIR),
                        help="cluster directory (default: $BATCHLAB_POSTGRES_DIR or "
                             f"{DEFAULT_DIR})")
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port on 127.0.0.1 (default: a free one, kept across restarts)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--remove", action="store_true",
                        help="with stop: delete the directory and all its data")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    server = LocalPostgres(args.dir, args.port, max_connections=args.max_connections,
                           remove=False)
    try:
        if args.command == "start":
            print(server.start())
        elif args.command == "stop":
            server.stop(remove=args.remove)
        elif args.command == "restart":
            if not server.is_running():
                raise LocalPostgresError(f"no running local PostgreSQL in {args.dir}")
            server.restart()
            print(server.url)
        elif args.command == "url":
            print(server.url)
        else:
            running = server.is_running()
            print(f"{'running' if running else 'stopped'} {args.dir}"
                  + (f" {server.url}" if running else ""))
            return 0 if running else 3
    except LocalPostgresError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
