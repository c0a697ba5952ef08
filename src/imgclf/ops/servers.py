"""Commands for the servers the project starts: loopback by default, never exposed without authentication."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

LOOPBACK_NAMES = {"localhost"}
# Both servers report usage to their vendors by default; on a machine without internet that is a wait too.
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
MIN_PASSWORD = 12


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _basic_auth_config(store: Path, env: dict[str, str]) -> Path:
    """MLflow's basic-auth app config beside the store (users in their own SQLite file), mode 0600."""
    password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"MLFLOW_AUTH_ADMIN_PASSWORD: set it (at least {MIN_PASSWORD} characters) to start the "
                         "MLflow server with authentication; clients use MLFLOW_TRACKING_USERNAME/PASSWORD")
    auth_dir = store / "auth"
    auth_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ini = auth_dir / "basic_auth.ini"
    database = env.get("IMGCLF_MLFLOW_AUTH_DATABASE_URI") or f"sqlite:///{auth_dir}/basic_auth.db"
    if database == f"sqlite:///{auth_dir}/basic_auth.db":  # the users' password hashes: this user's alone, as
        users = auth_dir / "basic_auth.db"  # the folder is (MLflow would create it 0644; empty is a valid SQLite db)
        os.close(os.open(users, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(users, 0o600)
    text = ("[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {database}\n"
            f"admin_username = {env.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return ini


def sync_admin_password(env: dict[str, str]) -> bool:
    """MLflow sets the admin's password only when it creates the user: a restart with a new
    MLFLOW_AUTH_ADMIN_PASSWORD would keep accepting the old one. The variable is the password, so an
    existing admin whose stored password differs is updated to it. Returns whether it changed.
    `env` is what mlflow_server_command returned (its auth config names the user database)."""
    import configparser

    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    ini = configparser.ConfigParser()
    ini.read(env["MLFLOW_AUTH_CONFIG_PATH"])
    username, password = ini["mlflow"]["admin_username"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    store = SqlAlchemyStore()
    store.init_db(ini["mlflow"]["database_uri"])
    try:
        if store.has_user(username, use_primary=True) and \
                not store.authenticate_user(username, password, use_primary=True):
            store.update_user(username, password=password)
            return True
        return False
    finally:
        store.engine.dispose()


def _secret_key(path: Path) -> str:
    """The auth app's CSRF secret: generated once, kept beside its user store (mode 0600), stable across restarts."""
    import secrets

    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def mlflow_server_command(store_dir: str | Path = "mlflow", host: str = "127.0.0.1", port: int = 5000,
                          allowed_hosts: list[str] | None = None, auth: bool = False,
                          environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """MLflow's tracking server (`python -m imgclf.ops.mlflow_serve`: `mlflow server` in one process) over the
    embedded store (same SQLite file and artifact folder as the pipeline),
    or over the team's backends when the environment names them (MLFLOW_BACKEND_STORE_URI, e.g.
    PostgreSQL; MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://bucket/path, served to clients through the
    server so workers need no S3 credentials; IMGCLF_MLFLOW_AUTH_DATABASE_URI for the users), and its
    environment.

    Host-header and CORS checks stay on. Bound to anything but loopback it needs `auth`
    (MLflow's basic-auth app, admin password from MLFLOW_AUTH_ADMIN_PASSWORD) and the host
    names clients use (`allowed_hosts`); both are checked before anything binds.
    The job runner (about 10 processes that this project never uses) and telemetry stay off.
    """
    env = dict(environ if environ is not None else os.environ)
    if not is_loopback(host):
        if not auth:
            raise ValueError(f"--host {host}: MLflow has no authentication of its own; add --auth (basic-auth, "
                             "admin password from MLFLOW_AUTH_ADMIN_PASSWORD) before exposing it; see docs/security.md")
        if not allowed_hosts:
            raise ValueError(f"--host {host}: name the host names clients will use with --allowed-host")
    for name in allowed_hosts or []:
        if "*" in name or not name.strip() or "," in name:
            raise ValueError(f"--allowed-host {name!r}: name each host exactly (a wildcard turns the DNS-rebinding "
                             "guard off)")
    store = Path(store_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    hosts = allowed_hosts or [f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1", "localhost"]
    # mlflow server reads both from the environment too: passed that way, a database password stays out of `ps`.
    env.setdefault("MLFLOW_BACKEND_STORE_URI", f"sqlite:///{store}/mlflow.db")
    env.setdefault("MLFLOW_ARTIFACTS_DESTINATION", (store / "artifacts").as_uri())
    cmd = [sys.executable, "-m", "imgclf.ops.mlflow_serve", "--host", host, "--port", str(port)]
    env.update({"MLFLOW_SERVER_ALLOWED_HOSTS": ",".join(hosts), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                **TELEMETRY_OFF})
    if auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_basic_auth_config(store, env))
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", _secret_key(store / "auth" / "flask_secret_key"))
        cmd.append("--auth")
    return cmd, env


def prefect_server_command(host: str = "127.0.0.1", port: int = 4200,
                           environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """`prefect server start` and the environment it needs: CSRF protection on, analytics off.

    Bound to anything but loopback it must have an auth string (PREFECT_SERVER_API_AUTH_STRING,
    `user:password`); clients then set PREFECT_API_AUTH_STRING to the same value.
    """
    env = dict(environ if environ is not None else os.environ)
    auth = env.get("PREFECT_SERVER_API_AUTH_STRING")
    if auth is not None or not is_loopback(host):
        user, sep, password = (auth or "").partition(":")
        if not sep or not user or len(password) < MIN_PASSWORD:
            where = "" if is_loopback(host) else f" before exposing the Prefect server on {host}"
            raise ValueError(f"PREFECT_SERVER_API_AUTH_STRING: set it as 'user:password' with a password of at least "
                             f"{MIN_PASSWORD} characters{where}; see docs/security.md")
    # Log lines go out to subscribers (`prefect deployment run --watch` shows them only then; events only otherwise).
    env.update({"PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true", "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
                "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true", **TELEMETRY_OFF})
    # The UI asks its API at PREFECT_UI_API_URL, which Prefect derives from PREFECT_API_URL or else port 4200, not
    # from --port: on any other port (or with PREFECT_API_URL naming another server) the UI said "Can't connect to
    # Server API". A value the user set (a reverse proxy, say) stays; a wildcard bind has no address to name.
    if "PREFECT_UI_API_URL" not in env and host not in ("0.0.0.0", "::", ""):
        env["PREFECT_UI_API_URL"] = f"http://{f'[{host}]' if ':' in host else host}:{port}/api"
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env
