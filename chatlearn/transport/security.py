"""Who may talk to a run's sockets: every connection proves it belongs to the run.

A run has a secret (`RunSecurity.secret`, 32 random bytes made by the coordinator) and, when it
spans hosts, CURVE keys (`TcpSecurity`). Processes get them at start-up on their stdin, never on a
command line or in the environment. Once a process has them (`configure`), the sockets it creates
authenticate every connection before a single message passes:

- ``ipc://``: a binding socket is a ZeroMQ PLAIN server, a connecting one presents the run's
  secret as its PLAIN password and its actor identity as user name. The run directory is mode
  0700 already; this keeps out other processes of the same user that find the socket files.
- ``tcp://``: CURVE as before (encryption and authentication): the binding socket accepts exactly
  the run's client public key.

A ZAP handler thread (ZeroMQ RFC 27) answers libzmq's authentication requests; the check is per
connection, so messages cost nothing extra (a per-message HMAC would cost ~10 ms per 16 MiB
micro-batch). A connection that fails it never delivers anything; refusals are counted and logged
at a capped rate. An authenticated ipc peer's user name reaches the receiver as each frame's
``User-Id`` property (`peer_name`), which a PULL socket cannot otherwise know.

PLAIN sends the secret in the clear over the connection: that is a local Unix socket here, which
only the kernel sees. A process of the same user can still read another's memory (ptrace); the
boundary this draws is against processes that merely reach the run's sockets.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq
from zmq.utils import z85

from chatlearn.transport.contexts import async_context

__all__ = [
    "RunSecurity",
    "TcpSecurity",
    "configure",
    "configure_tcp_security",
    "num_refused_connections",
    "peer_name",
    "run_security",
    "socket_options",
    "tcp_security",
]

log = logging.getLogger(__name__)

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_REBIND_WAIT = 5.0  # seconds a new handler waits for the last one's endpoint (_bind_when_free)
_ZAP_DOMAIN = b"chatlearn"
# Refusals logged one by one before the log switches to one summary line per interval.
_NUM_REFUSALS_LOGGED = 5
_REFUSAL_LOG_INTERVAL = 10.0


@dataclass(frozen=True, kw_only=True)
class TcpSecurity:
    """A run's CURVE keys (Z85 bytes): one pair for binding sockets, one for connecting ones."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def to_payload(self) -> dict[str, str]:
        return {k: v.decode("ascii") for k, v in asdict(self).items()}

    @classmethod
    def from_payload(cls, payload: Any) -> TcpSecurity:
        names = ("server_public", "server_secret", "client_public", "client_secret")
        if not isinstance(payload, dict) or set(payload) != set(names):
            raise ValueError(f"CURVE keys must be a mapping of exactly {names}")
        values = {k: str(payload[k]).encode("ascii") for k in names}
        if any(len(v) != 40 for v in values.values()):
            raise ValueError("CURVE keys must be 40-character Z85 strings")
        return cls(**values)

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        return f"TcpSecurity(server_public={self.server_public!r}, ...)"


@dataclass(frozen=True, kw_only=True)
class RunSecurity:
    """What proves a process belongs to one run: its secret, and CURVE keys across hosts."""

    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    curve: TcpSecurity | None = None

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("a run secret must have at least 16 bytes")

    def to_payload(self) -> dict[str, Any]:
        curve = self.curve.to_payload() if self.curve is not None else None
        return {"secret": self.secret.hex(), "curve": curve}

    @classmethod
    def from_payload(cls, payload: Any) -> RunSecurity:
        if not isinstance(payload, dict) or not isinstance(payload.get("secret"), str):
            raise ValueError("run security must be a mapping with a hex 'secret'")
        curve = payload.get("curve")
        return cls(
            secret=bytes.fromhex(payload["secret"]),
            curve=None if curve is None else TcpSecurity.from_payload(curve),
        )

    def __repr__(self) -> str:
        return f"RunSecurity(secret=..., curve={self.curve!r})"


class _ZapHandler:
    """ZeroMQ's ZAP protocol on a thread: accepts PLAIN with an accepted run secret and CURVE
    with an accepted client key; refuses everything else."""

    def __init__(self, context: zmq.Context) -> None:
        # A plain (non-asyncio) socket on the same libzmq context: inproc endpoints are shared.
        self._sock: zmq.Socket[Any] = zmq.Context.shadow(context.underlying).socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            _bind_when_free(self._sock, _ZAP_ENDPOINT)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self._stop = threading.Event()
        self.num_refused = 0
        self._logged_at = 0.0
        self._logged_count = 0
        self._thread = threading.Thread(target=self._run, name="chatlearn-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._sock.poll(100):
                    self._sock.send_multipart(self._answer(self._sock.recv_multipart()))
        except zmq.ZMQError:  # context terminated: the process is exiting
            pass
        finally:
            self._sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        version, request_id = (request + [b"", b""])[:2]
        mechanism = request[5] if len(request) > 5 else b""
        credentials = request[6:]
        user = _accepted(mechanism, credentials)
        if user is None:
            self._refused(mechanism)
            return [version, request_id, b"400", b"not a peer of this run", b"", b""]
        return [version, request_id, b"200", b"OK", user, b""]

    def _refused(self, mechanism: bytes) -> None:
        self.num_refused += 1
        now = time.monotonic()
        if self.num_refused <= _NUM_REFUSALS_LOGGED:
            log.warning(
                "refused a %s connection without the run's credentials",
                mechanism.decode(errors="replace") or "?",
            )
            self._logged_at, self._logged_count = now, self.num_refused
        elif now - self._logged_at >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %d more connections without the run's credentials (%d in all)",
                self.num_refused - self._logged_count,
                self.num_refused,
            )
            self._logged_at, self._logged_count = now, self.num_refused

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def _bind_when_free(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Bind `sock` to the inproc `endpoint`, waiting up to `_REBIND_WAIT` seconds for it to be
    free.
    The previous run's handler is stopped (its thread joined, its socket closed) before the next
    run's binds, but libzmq lets go of an inproc name only once its reaper thread has destroyed
    the closed socket, and a handler thread that missed its join's 2 s on a loaded machine
    closes it later still: the next run's start failed with EADDRINUSE, and its actors, left
    without a ZAP handler, could not connect."""
    deadline = time.monotonic() + _REBIND_WAIT
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


def _accepted(mechanism: bytes, credentials: list[bytes]) -> bytes | None:
    """The authenticated peer's user name, or None to refuse."""
    state = _state
    if mechanism == b"PLAIN" and len(credentials) == 2:
        username, password = credentials
        if any(hmac.compare_digest(password, run.secret) for run in state.runs):
            return username
    elif mechanism == b"CURVE" and len(credentials) == 1:
        if any(
            run.curve is not None
            and hmac.compare_digest(credentials[0], z85.decode(run.curve.client_public))
            for run in state.runs
        ):
            return b""
    return None


@dataclass(frozen=True)
class _State:
    """The process's security, replaced as a whole (the ZAP thread reads it without a lock)."""

    runs: tuple[RunSecurity, ...] = ()  # accepted; the last one is what this process presents
    identity: bytes = b""
    tcp_only: TcpSecurity | None = None  # `configure_tcp_security` without a run secret


_state = _State()
_zap: _ZapHandler | None = None
_lock = threading.Lock()


def configure(
    run: RunSecurity | None,
    context: zmq.Context | None = None,
    *,
    identity: bytes = b"",
    add: bool = False,
) -> None:
    """Use `run` for the sockets this process creates from now on (None: no security).

    Call it before creating the run's sockets, with the context they use. `identity` is the user
    name this process presents. With ``add=True`` the run is accepted next to those already
    configured (a coordinator that runs several engines at once); `remove` takes one back.
    """
    global _state
    with _lock:
        before = _state
        if run is None:
            _state = _State()
        else:
            runs = (*(_state.runs if add else ()), run)
            _state = _State(runs=runs, identity=identity or _state.identity)
        try:
            _sync_zap(context)
        except BaseException:
            _state = before  # not half configured: the next run starts from what was
            raise


def remove(run: RunSecurity) -> None:
    """Stop accepting `run` (its coordinator closed)."""
    global _state
    with _lock:
        runs = tuple(r for r in _state.runs if r is not run)
        _state = _State(runs=runs, identity=_state.identity if runs else b"")
        _sync_zap(None)


def configure_tcp_security(
    security: TcpSecurity | None, context: zmq.Context | None = None
) -> None:
    """CURVE keys for tcp sockets only (ipc unchanged); None: back to plain."""
    if security is None:
        configure(None)
    else:
        configure(RunSecurity(curve=security), context)
        global _state
        _state = _State(runs=_state.runs, identity=_state.identity, tcp_only=security)


def _sync_zap(context: zmq.Context | None) -> None:
    global _zap
    if _state.runs and _zap is None:
        _zap = _ZapHandler(async_context(context))
    elif not _state.runs and _zap is not None:
        _zap.stop()
        _zap = None


def run_security() -> RunSecurity | None:
    """The run this process presents itself as part of, if any."""
    return _state.runs[-1] if _state.runs else None


def tcp_security() -> TcpSecurity | None:
    """The CURVE keys tcp sockets use, if any."""
    run = run_security()
    return run.curve if run is not None else None


def num_refused_connections() -> int:
    """Connections the ZAP handler refused since security was configured (for tests/logs)."""
    return _zap.num_refused if _zap is not None else 0


def socket_options(endpoint: str, *, bind: bool) -> dict[int, int | bytes]:
    """The options a socket needs for `endpoint` under this process's security."""
    state = _state
    run = state.runs[-1] if state.runs else None
    if endpoint.startswith("tcp://"):
        return _tcp_options(endpoint, run.curve if run is not None else None, bind=bind)
    if run is None or state.tcp_only is not None or not endpoint.startswith("ipc://"):
        return {}
    if bind:
        return {zmq.PLAIN_SERVER: 1, zmq.ZAP_DOMAIN: _ZAP_DOMAIN}
    return {zmq.PLAIN_USERNAME: state.identity or b"chatlearn", zmq.PLAIN_PASSWORD: run.secret}


def _tcp_options(endpoint: str, curve: TcpSecurity | None, *, bind: bool) -> dict[int, int | bytes]:
    if curve is None:
        if bind and not _is_loopback(endpoint):
            raise ValueError(
                f"refusing to bind {endpoint} without CURVE security: only loopback addresses "
                "may carry plain tcp (multi-host runs configure keys with `chatlearn launch`)"
            )
        return {}
    if bind:
        return {
            zmq.CURVE_SERVER: 1,
            zmq.CURVE_SECRETKEY: curve.server_secret,
            zmq.ZAP_DOMAIN: _ZAP_DOMAIN,
        }
    return {
        zmq.CURVE_SERVERKEY: curve.server_public,
        zmq.CURVE_PUBLICKEY: curve.client_public,
        zmq.CURVE_SECRETKEY: curve.client_secret,
    }


def _is_loopback(endpoint: str) -> bool:
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_name(frame: Any) -> str | None:
    """The authenticated user name of the peer that sent `frame` (a `zmq.Frame`), if known."""
    try:
        name = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return name or None
