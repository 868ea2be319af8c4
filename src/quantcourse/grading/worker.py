"""The untrusted side of grading: runs one student's cells inside the sandbox and answers calls.

Started by :class:`quantcourse.grading.sandbox.Sandbox` as ``python -m quantcourse.grading.worker IN OUT``
inside bubblewrap. It reads requests (frames of :mod:`quantcourse.grading.wire`) from fd ``IN`` and writes
one reply per request to fd ``OUT``:

``exec``      run a cell's source in the student's namespace; reply with its stdout/stderr and error
``lookup``    the current values of some top-level names (functions and other objects as handles)
``call``      call a handle with arguments; reply with the result and any tensor argument it changed
``backward``  gradients of an earlier call's tensor results with respect to its inputs (autograd)
``getattr``   an attribute of a handle
``getitem``   ``handle[key]`` (a Triton kernel's launcher ``kernel[grid]``)

Nothing here is trusted: the student's code runs in this process and can replace any of it. The grader
decides nothing from what this process says except the values it returns, which it decodes with checks.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import traceback

__all__ = ["main"]

OUTPUT_CAP = 20_000  # characters of stdout/stderr kept per cell


class _CappedWriter(io.TextIOBase):
    def __init__(self, cap: int = OUTPUT_CAP):
        self.parts, self.size, self.cap, self.dropped = [], 0, cap, False

    def writable(self):
        return True

    def write(self, text):
        text = str(text)
        if self.size < self.cap:
            self.parts.append(text[: self.cap - self.size])
        self.dropped |= self.size + len(text) > self.cap
        self.size += len(text)
        return len(text)

    def text(self) -> str:
        return "".join(self.parts) + ("\n[output cut: too long]\n" if self.dropped else "")


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _error(exc: BaseException, filename_prefix: str = "<cell") -> dict:
    """Type (the first builtin class in its MRO), message and the frames in the student's cells."""
    builtin = next((c for c in type(exc).__mro__ if c.__module__ == "builtins"), BaseException)
    frames = [
        f"{f.filename}, line {f.lineno}: {(f.line or '').strip()}"
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename.startswith(filename_prefix)
    ]
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a student's exception may fail to print
        message = "(the exception's message could not be printed)"
    return {"type": builtin.__name__, "message": message[:4000], "frames": frames[-8:]}


class Worker:
    def __init__(self, fd_in: int, fd_out: int):
        import torch

        from . import wire

        self.wire, self.torch = wire, torch
        self.fd_in, self.fd_out = fd_in, fd_out
        self.namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        self.handles: dict[int, object] = {}
        self.graphs: dict[int, tuple] = {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pid = os.getpid()
        # bubblewrap's child in its own PID namespace (never the grader's own processes: --no-sandbox)
        self.sandboxed = os.environ.get("QUANTCOURSE_SANDBOX") == "1" and self.pid == 2 and os.getppid() == 1

    def _only_the_worker(self) -> None:
        """A process the student's code forked never answers on the pipe: it ends here. In the sandbox,
        processes a cell or call started end with it too (a fork bomb lasts until its cell returns)."""
        if os.getpid() != self.pid:
            os._exit(0)
        if self.sandboxed:
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)  # every process of the sandbox but its init and this one

    # -- handles

    def _handle(self, obj) -> dict:
        ident = id(obj)
        self.handles[ident] = obj
        kind = "class" if isinstance(obj, type) else "callable" if callable(obj) else "object"
        return {"t": "ref", "id": ident, "kind": kind, "name": getattr(obj, "__qualname__", type(obj).__name__)}

    def _encode(self, value):
        encoder = self.wire.Encoder(other=self._handle)
        return encoder.encode(value), encoder

    def _decode(self, node, blobs):
        decoder = self.wire.Decoder(blobs, ref=lambda ident, _: self.handles[ident], device=None)
        return decoder.decode(node), decoder

    # -- requests

    def op_exec(self, request, blobs):
        source, name = str(request["source"]), str(request.get("filename", "<cell>"))
        out, err = _CappedWriter(), _CappedWriter()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        error = None
        import linecache

        linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # code lines in tracebacks
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(request.get("timeout", 60))))
        try:
            exec(compile(source, name, "exec"), self.namespace)  # noqa: S102 - the sandbox's purpose
        except _Timeout:
            error = {"type": "TimeoutError", "message": "the cell ran past the time limit", "frames": []}
        except BaseException as exc:  # noqa: BLE001 - the student's code may raise anything, SystemExit included
            error = _error(exc)
        finally:
            self._only_the_worker()
            signal.alarm(0)
            sys.stdout, sys.stderr = saved
        return {"stdout": out.text(), "stderr": err.text(), "error": error}, []

    def op_lookup(self, request, blobs):
        found = {}
        for name in request["names"]:
            if name in self.namespace:
                found[name] = self.namespace[name]
        node, encoder = self._encode(found)
        return {"value": node}, encoder.blobs

    def op_getattr(self, request, blobs):
        value = getattr(self.handles[request["ref"]], str(request["name"]))
        node, encoder = self._encode(value)
        return {"value": node}, encoder.blobs

    def op_getitem(self, request, blobs):
        ((key,), _), _ = self._decode(request["key"], blobs)
        try:
            value = self.handles[request["ref"]][key]
        except BaseException as exc:  # noqa: BLE001 - the student's object may raise anything
            return {"error": _error(exc)}, []
        node, encoder = self._encode(value)
        return {"value": node}, encoder.blobs

    def op_call(self, request, blobs):
        torch = self.torch
        target = self.handles[request["ref"]]
        (args, kwargs), decoder = self._decode(request["args"], blobs)
        snapshots = [t.detach().clone() for t in decoder.tensors]
        versions = [t._version for t in decoder.tensors]
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(request.get("timeout", 60))))
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = _CappedWriter()
        try:
            result = target(*args, **kwargs)
        except _Timeout:
            return {"error": {"type": "TimeoutError", "message": "the call ran past the time limit", "frames": []}}, []
        except BaseException as exc:  # noqa: BLE001
            return {"error": _error(exc)}, []
        finally:
            self._only_the_worker()
            signal.alarm(0)
            sys.stdout, sys.stderr = saved
        changed = [
            i
            for i, (t, before, version) in enumerate(zip(decoder.tensors, snapshots, versions, strict=False))
            if t._version != version
            or t.shape != before.shape
            or t.dtype != before.dtype
            or not torch.equal(t.detach().reshape(-1).view(torch.uint8), before.reshape(-1).view(torch.uint8))
        ]
        node, encoder = self._encode({"result": result, "changed": [(i, decoder.tensors[i].detach()) for i in changed]})
        graph = None
        if request.get("grad"):
            inputs = [t for t in decoder.tensors if t.requires_grad]
            outputs = [t for t in encoder.tensors if isinstance(t, torch.Tensor) and t.requires_grad]
            if inputs and outputs:
                graph = id(outputs[0])
                self.graphs[graph] = (inputs, outputs)
        return {
            "value": node,
            "graph": graph,
            "grad_outputs": [t.requires_grad for t in encoder.tensors],
        }, encoder.blobs

    def op_backward(self, request, blobs):
        torch = self.torch
        inputs, outputs = self.graphs[request["graph"]]
        grads, _ = self._decode(request["grads"], blobs)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=False) if g is not None]
        try:
            result = torch.autograd.grad(
                [o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True, retain_graph=True
            )
        except BaseException as exc:  # noqa: BLE001
            return {"error": _error(exc)}, []
        node, encoder = self._encode(list(result))
        return {"value": node}, encoder.blobs

    def serve(self) -> None:
        wire = self.wire
        while True:
            try:
                request, blobs = wire.read_frame(self.fd_in)
            except EOFError:
                return
            op = getattr(self, f"op_{request.get('op')}", None)
            try:
                reply, out_blobs = op(request, blobs) if op else ({"error": {"type": "ValueError", "message": "?"}}, [])
            except BaseException as exc:  # noqa: BLE001 - a failure to answer is reported, not fatal
                reply, out_blobs = {"error": _error(exc, "")}, []
            wire.write_frame(self.fd_out, {"id": request.get("id"), **reply}, out_blobs)


def _block(target: str) -> None:
    import importlib

    module_name, _, attr = target.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ImportError:
        return
    message = f"this exercise asks you to write it yourself: calling {target} does not count"

    def blocked(*args, **kwargs):
        raise AssertionError(message)

    if hasattr(owner, attr):
        setattr(owner, attr, blocked)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fd_in, fd_out = int(argv[0]), int(argv[1])
    sys.stdin = open(os.devnull)  # noqa: SIM115
    worker = Worker(fd_in, fd_out)
    from . import wire

    for target in argv[2:]:  # forbidden functions with no Python source (e.g. torch.quantile)
        _block(target)

    wire.write_frame(fd_out, {"id": 0, "ready": True, "pid": os.getpid()})
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
