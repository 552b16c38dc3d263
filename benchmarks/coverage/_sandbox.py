"""Run one function per architecture in a forked child with a memory cap and a time limit.

The parent imports torch and the libraries once; each child is a ``fork`` of it,
so a child starts in milliseconds, and whatever it does (a runaway allocation,
a segfault, a hang, a changed global) dies with it.  The child sets
``RLIMIT_AS`` on itself, runs the function and writes its result (a dict) as
JSON to a pipe; the parent reads every pipe with ``select``, kills a child
that runs past its time limit, and turns a child that died into a result
that says how.
"""
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

__all__ = ["run_all"]


def _child(function, item, memory_bytes, seconds, write_fd, quiet):
    """In the forked child: limit, run, send the result, exit without cleanup."""
    status = 0
    try:
        _die_with_parent()
        if quiet:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
        if memory_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        # A second guard beside the parent's: the child stops itself politely
        # first (SIGALRM raises in Python code), the parent kills it later.
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(seconds)))
        try:
            result = function(item)
        except _Timeout:
            result = {"status": "not built", "reason": "time limit ({} s) reached".format(int(seconds))}
        except MemoryError:
            result = {"status": "not built",
                      "reason": "memory limit ({} GiB) reached".format(memory_bytes >> 30)}
        except BaseException as error:  # anything else from the harness itself
            result = {"status": "not built", "reason": "harness error: " + _one_line(error),
                      "traceback": traceback.format_exc()[-2000:]}
        signal.alarm(0)
        data = json.dumps(result, default=str).encode()
        view = memoryview(data)
        while view:
            written = os.write(write_fd, view)
            view = view[written:]
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _die_with_parent():
    """Linux: have the kernel kill this child when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Timeout(BaseException):
    """Raised by SIGALRM in the child; a BaseException so that model code does not swallow it."""


def _alarm(signum, frame):
    raise _Timeout()


def _one_line(error):
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return "{}: {}".format(type(error).__name__, text) if text else type(error).__name__


def run_all(function, items, jobs=1, memory_gb=6.0, seconds=180.0, quiet=True, on_result=None):
    """Run ``function(item)`` for each item in its own forked child; return the results in order.

    Each result is the dict the function returned, plus ``name`` (the item) and
    ``seconds`` (wall time of the child).  A child that dies or runs past
    ``seconds`` (the parent kills it 30 s after its own alarm) gives
    ``{'status': 'not built', 'reason': ...}``.  ``on_result(index, result)`` is
    called as each result arrives (for progress).
    """
    memory_bytes = int(memory_gb * (1 << 30)) if memory_gb else 0
    pending = list(enumerate(items))
    pending.reverse()
    running = {}  # read fd -> (pid, index, item, started, chunks)
    results = [None] * len(items)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        _loop(function, pending, running, results, jobs, memory_bytes, seconds, quiet, on_result)
    finally:  # interrupted (Ctrl-C, SIGTERM): no child outlives the sweep
        for fd, (pid, *_rest) in running.items():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            os.close(fd)
    return results


def _loop(function, pending, running, results, jobs, memory_bytes, seconds, quiet, on_result):
    while pending or running:
        while pending and len(running) < max(1, jobs):
            index, item = pending.pop()
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(function, item, memory_bytes, seconds, write_fd, quiet)
            os.close(write_fd)
            running[read_fd] = (pid, index, item, time.monotonic(), [])
        ready, _, _ = select.select(list(running), [], [], 1.0)
        now = time.monotonic()
        for fd in list(running):
            pid, index, item, started, chunks = running[fd]
            done = False
            if fd in ready:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    chunks.append(chunk)
                else:
                    done = True
            if not done and now - started > seconds + 30:
                os.kill(pid, signal.SIGKILL)
                done = True
            if not done:
                continue
            os.close(fd)
            _, wait_status = os.waitpid(pid, 0)
            result = _decode(b"".join(chunks), wait_status, seconds, memory_bytes)
            result["name"] = item
            result["seconds"] = round(time.monotonic() - started, 2)
            results[index] = result
            del running[fd]
            if on_result is not None:
                on_result(index, result)


def _decode(data, wait_status, seconds, memory_bytes):
    if data:
        try:
            return json.loads(data.decode())
        except ValueError:
            pass
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        if signum == signal.SIGKILL:
            reason = "killed: time limit ({} s) or memory".format(int(seconds))
        else:
            reason = "child died of signal {}".format(signal.Signals(signum).name)
    else:
        reason = "child exited with status {} and no result".format(os.WEXITSTATUS(wait_status))
    if memory_bytes:
        reason += " (memory cap {:.0f} GiB)".format(memory_bytes / (1 << 30))
    return {"status": "not built", "reason": reason}
