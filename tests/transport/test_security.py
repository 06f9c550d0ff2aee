"""The ZAP handler of a run's security, as the next run in the same process starts it."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from chatlearn.transport import security

pytestmark = pytest.mark.timeout(30)


def test_a_new_zap_handler_waits_for_the_last_ones_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # libzmq lets go of an inproc name only once the closed socket is destroyed (its reaper
    # thread), and the last handler's thread may close it late on a loaded machine: the next
    # run's handler waits for the name (its start failed with EADDRINUSE), a bounded time
    context = zmq.Context()  # its own inproc names: no other test's handler is in the way
    try:
        last = context.socket(zmq.REP)
        last.bind(security._ZAP_ENDPOINT)
        threading.Timer(0.3, last.close, kwargs={"linger": 0}).start()
        started = time.monotonic()
        handler = security._ZapHandler(context)
        try:
            assert 0.25 < time.monotonic() - started < security._REBIND_WAIT
        finally:
            handler.stop()
        held = context.socket(zmq.REP)
        # the stopped handler's socket lets go of the name once the reaper has destroyed it:
        # waited for as a new handler does (a bare bind here failed on a loaded machine)
        security._bind_when_free(held, security._ZAP_ENDPOINT)
        monkeypatch.setattr(security, "_REBIND_WAIT", 0.2)
        second = context.socket(zmq.REP)
        try:
            started = time.monotonic()
            with pytest.raises(zmq.ZMQError) as error:
                security._bind_when_free(second, security._ZAP_ENDPOINT)
            assert error.value.errno == zmq.EADDRINUSE  # past the wait: the error it was
            assert 0.15 < time.monotonic() - started < 2
        finally:
            held.close(linger=0)
            second.close(linger=0)
    finally:
        context.destroy(linger=0)
