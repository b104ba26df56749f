"""Connecting to Ray: a private instance bound to 127.0.0.1 for one run, or a running cluster at an address checked
to answer first (:func:`connect`, :func:`unreachable`); the Ray backend (:mod:`downpour.backends.ray`) calls it."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator

from downpour.backends import ray_missing
from downpour.errors import DownpourError

try:
    import ray
    from ray.exceptions import RayError
except ImportError:  # pragma: no cover - exercised only where Ray is missing
    raise ray_missing() from None

INLINE_BYTES = 1 << 20  # max_direct_call_object_size of an instance we start: shards up to 256K floats go inline
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # shared-memory object store of an instance we start
# Ray's settings for an instance we start (scripts/ray_cluster.sh passes the same to `ray start`): updates up to
# INLINE_BYTES inline in the call; actor processes at the driver's priority (Ray's default, nice 15, has training
# actors yield the CPU to every other process on the machine, which the local backend's workers do not).
SYSTEM_CONFIG = {"max_direct_call_object_size": INLINE_BYTES, "worker_niceness": 0}
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # where Ray's processes find the token (else ~/.ray/auth_token)
_token_env_before: dict[str, str | None] = {}  # this process's own token settings, while a private instance runs


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at the Ray head ``address`` ("host:port", or "auto" as Ray resolves it), or None when
    something accepts a connection there (or the address is one to leave to Ray: a client ``ray://`` address, or
    "auto" with no cluster found, which Ray reports at once). ``ray.init`` itself retries an unreachable head for
    minutes, printing its own warnings, instead of failing."""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or ""
        except Exception:  # any failure here is ray.init's to report
            return None
    host, colon, port = address.rpartition(":")
    if "://" in address or not colon or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing accepts connections at {host}:{port} ({exc.strerror or exc})"


@contextlib.contextmanager
def _keep_loopback() -> Iterator[None]:
    """While starting or joining Ray, keep 127.0.0.1 as this node's address instead of resolving it.

    Ray binds its servers to the node's address, and resolves 127.0.0.1 to the machine's routable address first
    (so that other machines could join). Its switch for single-machine clusters, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    (named for the platforms where it is the default), keeps the loopback address: read by this process at Ray's
    import, and by every process Ray starts from its environment.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = saved_env


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one logger's warnings for a moment."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def connect(address: str = "", *, num_cpus: int | None = None, object_store_bytes: int = OBJECT_STORE_BYTES
            ) -> str | None:  # fmt: skip
    """Connect this process to Ray, or start a private instance; return that instance's temporary directory (its
    token and Ray's own directory, in a directory only this user can enter; :func:`disconnect` removes it).

    ``address`` ``""`` starts a local instance bound to 127.0.0.1 (``num_cpus``, default all cores; no dashboard;
    a ``object_store_bytes`` object store; updates up to :data:`INLINE_BYTES` inline), with token authentication
    (Ray's default for a new instance); ``"auto"`` or ``"host:port"`` connects (with the token Ray finds when
    ``RAY_AUTH_MODE=token``). Returns None when connecting, or when this process is connected already.
    """
    if ray.is_initialized():
        return None
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if address == "" and mode.lower() != "token":
        raise DownpourError(f"RAY_AUTH_MODE={mode} would start Ray without token authentication; unset it")
    if address == "":
        temp_dir = tempfile.mkdtemp(prefix="downpour-ray-")
        try:
            _use_own_token(temp_dir)
            with _keep_loopback(), _quiet("ray._private.authentication.authentication_token_setup"):
                ray.init(
                    address="local",
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    num_cpus=num_cpus or os.cpu_count() or 1,
                    object_store_memory=object_store_bytes,
                    _system_config=SYSTEM_CONFIG,
                    _temp_dir=os.path.join(temp_dir, "ray"),  # Ray makes it 0777; temp_dir stays 0700
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
        except (ConnectionError, RayError, RuntimeError, ValueError) as exc:
            disconnect(temp_dir)
            raise DownpourError(f"cannot start a local Ray instance: {first_line(exc)}") from None
        except BaseException:  # Ctrl-C while Ray starts: stop what started, leave no directory behind
            disconnect(temp_dir)  # (it lets no failure of the shutdown through)
            raise
        return temp_dir
    try:
        if (reason := unreachable(address)) is not None:
            raise ConnectionError(reason)
        with _keep_loopback() if address != "auto" and _is_loopback(address) else contextlib.nullcontext():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RayError, RuntimeError, ValueError) as exc:
        raise DownpourError(
            f"cannot reach Ray at cluster.address = {address!r}: {first_line(exc)} (is it running? if it uses token "
            "authentication, export RAY_AUTH_MODE=token and the token: RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        ) from None
    return None


def disconnect(temp_dir: str | None) -> None:
    """Shut down the private instance :func:`connect` started (``temp_dir``, what it returned; None: this process
    connected to a cluster it did not start, and stays connected), remove its directory and token, and give this
    process back the token settings it had."""
    if temp_dir is None:
        return
    with contextlib.suppress(Exception):
        ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    for name, value in _token_env_before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _token_env_before.clear()
    _forget_cached_token()


def _use_own_token(temp_dir: str) -> None:
    """Give the private instance about to start a token of its own: fresh, in ``temp_dir`` (made 0700 by mkdtemp),
    readable by this user only. Left to Ray, a new instance writes ``~/.ray/auth_token`` readable by every user of
    the machine and reuses it for every later instance, so one read of it would open all of them; each Ray process
    finds the token through the environment it inherits."""
    path = os.path.join(temp_dir, "auth_token")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as token:
        token.write(secrets.token_hex(32))
    if not _token_env_before:  # the settings of this process before any private instance
        _token_env_before.update({name: os.environ.get(name) for name in _TOKEN_ENV})
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    _forget_cached_token()


def _forget_cached_token() -> None:
    """Have Ray read its token again (it caches the first one read in this process)."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
