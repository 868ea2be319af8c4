"""The trusted grading path: a submission's grade decided where its code never ran.

For one (student, assignment):

1. **Canonical notebook.** The instructor's master (``solutions/<A>/<A>.ipynb``, hidden tests included)
   is the notebook that gets graded. From the submission only the *sources* of the answer cells (by
   nbgrader ``grade_id``) and of cells the student added are taken; its outputs, metadata, test cells and
   locked cells are ignored, so deleting, reordering or adding cells, or leftovers of a restarted kernel,
   change nothing.
2. **Student program, sandboxed.** Those cells run, in the student's order, with the master's locked
   cells in place of the student's copies, inside a :class:`~quantcourse.grading.sandbox.Sandbox`.
3. **Tests, trusted.** The master's test cells (visible and hidden) run here, in the grader's own
   process, in a fresh namespace where every name an answer cell defines is a proxy: calling it sends the
   arguments to the sandbox (:mod:`~quantcourse.grading.wire`: tensors as raw bytes, never pickle) and
   decodes the result. Tensor arguments the student's function changed in place are copied back, and
   gradients flow through a call (a remote autograd node). Nothing the student's code does to ``torch``,
   ``quantcourse`` or the worker can change a comparison made here.
4. **Record.** The result is a notebook: the master's cells with the student's answers, and outputs
   written by this process only (stdout of the tests, and an error for each failed test). nbgrader then
   stores it in the gradebook without executing anything (see :mod:`quantcourse.grading.autograde`).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import io
import random
import signal
import time
import traceback
from pathlib import Path

import nbformat
import torch

from . import wire
from .sandbox import LibraryView, Limits, Sandbox, SandboxError

__all__ = ["Master", "TrustedGrader", "GradedNotebook", "StudentError", "canonical_program"]

HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
MAX_RESTARTS = 4


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


@dataclasses.dataclass
class MasterCell:
    index: int
    kind: str  # "answer", "test", "locked", "other", "markdown", "manual"
    grade_id: str | None
    source: str
    names: tuple[str, ...] = ()  # top-level names an answer cell defines


def _defined_names(source: str) -> tuple[str, ...]:
    """Top-level names that ``source`` binds (functions, classes, assignments), in order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ()
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
    return tuple(dict.fromkeys(names))


def _imports(source: str) -> str:
    """The top-level import statements of ``source`` (a master's answer cell may import what tests use)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    return "\n".join(ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


class Master:
    """The instructor's master notebook of one assignment, classified cell by cell."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.nb = nbformat.read(self.path, as_version=4)
        self.cells: list[MasterCell] = []
        for index, cell in enumerate(self.nb.cells):
            meta = _nbgrader(cell)
            grade_id = meta.get("grade_id")
            if cell.cell_type != "code":
                kind = "manual" if meta.get("solution") else "markdown"
            elif meta.get("solution"):
                kind = "answer"
            elif meta.get("grade"):
                kind = "test"
            elif grade_id:
                kind = "locked"
            else:
                kind = "other"
            names = _defined_names(cell.source) if kind == "answer" else ()
            self.cells.append(MasterCell(index, kind, grade_id, cell.source, names))
        self.by_id = {c.grade_id: c for c in self.cells if c.grade_id}

    @property
    def tests(self) -> list[MasterCell]:
        return [c for c in self.cells if c.kind == "test"]


def canonical_program(master: Master, submission) -> list[tuple[str, str, str | None]]:
    """The cells the sandbox runs, as ``(filename, source, answer grade_id or None)``.

    The student's code cells in the student's order, where a cell carrying the ``grade_id`` of a master
    locked cell gets the master's source and one carrying a test cell's is skipped (tests run trusted);
    master locked cells the student deleted come first, in the master's order.
    """
    program, seen = [], set()
    for position, cell in enumerate(submission.cells if submission is not None else []):
        if cell.get("cell_type") != "code":
            continue
        grade_id = _nbgrader(cell).get("grade_id")
        known = master.by_id.get(grade_id) if isinstance(grade_id, str) else None
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        if known is not None and known.kind == "test":
            continue
        if known is not None and known.kind == "locked":
            seen.add(known.grade_id)
            program.append((f"<cell {known.grade_id}>", known.source, None))
        elif known is not None and known.kind == "answer":
            program.append((f"<cell {known.grade_id}>", source, known.grade_id))
        else:
            program.append((f"<cell {position + 1} (added)>", source, None))
    missing = [(f"<cell {c.grade_id}>", c.source, None) for c in master.cells if c.kind == "locked"]
    missing = [m for m in missing if m[0][6:-1] not in seen]
    return missing + program


# -------------------------------------------------------------------------------------------- proxies


class StudentError(Exception):
    """Base of the exceptions re-raised here for an exception the student's code raised in the sandbox."""

    frames: tuple[str, ...] = ()


_EXCEPTION_TYPES: dict[str, type] = {}


def _student_exception(name: str, message: str, frames) -> BaseException:
    import builtins

    base = getattr(builtins, name, None)
    if not (isinstance(base, type) and issubclass(base, Exception)) or name == "StopIteration":
        base = RuntimeError
    cls = _EXCEPTION_TYPES.get(base.__name__)
    if cls is None:
        cls = _EXCEPTION_TYPES[base.__name__] = type(base.__name__, (base, StudentError), {})
    exc = cls(message)
    exc.frames = tuple(str(f) for f in frames or ())[:8]
    return exc


class SandboxDied(AssertionError):
    """The sandbox ended, or ran past its time, during a call: the test that made the call fails."""


class Session:
    """The grader's side of one submission's sandbox: restarts, handles, calls."""

    def __init__(self, program, view: LibraryView, limits: Limits, slot: int, deadline: float):
        self.program, self.view, self.limits, self.slot = program, view, limits, slot
        self.deadline = deadline
        self.box: Sandbox | None = None
        self.generation = 0
        self.skip: set[int] = set()  # program cells that killed or hung the sandbox
        self.cell_results: dict[int, dict] = {}
        self.names: dict[str, dict] = {}
        self.broken: str | None = None  # set when the sandbox died during the current test
        self.problems: list[str] = []
        self.restarts = 0
        self.isolate = True

    # -- life cycle

    def start(self, interface: list[str]) -> None:
        """(Re)start the sandbox, run the program (skipping cells that killed it) and look up names."""
        while True:
            if self.box is not None:
                self.box.close()
            self.generation += 1
            self.box = Sandbox(self.view, self.limits, slot=self.slot, isolate=self.isolate)
            failed_at = None
            for position, (filename, source, _) in enumerate(self.program):
                if position in self.skip:
                    continue
                try:
                    reply, _ = self.box.request(
                        {"op": "exec", "source": source, "filename": filename}, timeout=self._t()
                    )
                except SandboxError as err:
                    failed_at = position
                    self.cell_results[position] = {"error": {"type": "SandboxError", "message": str(err)}}
                    self.problems.append(f"{filename.strip('<>')}: {err}")
                    break
                if position not in self.cell_results:
                    self.cell_results[position] = reply
            if failed_at is None:
                break
            self.skip.add(failed_at)
            self.restarts += 1
            if self.restarts > MAX_RESTARTS or time.monotonic() > self.deadline:
                self.names = {}
                return
        reply, blobs = self.box.request({"op": "lookup", "names": interface}, timeout=self._t())
        self.names = _checked(lambda: wire.Decoder(blobs, ref=lambda i, node: node).decode(reply.get("value")))
        if not isinstance(self.names, dict):
            self.names = {}

    def _t(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SandboxError("grading this submission ran past its time limit")
        return min(self.limits.call_timeout, left)

    def ensure(self, interface: list[str]) -> None:
        if self.box is None or not self.box.alive:
            self.restarts += 1
            if self.restarts > MAX_RESTARTS:
                raise SandboxDied("the sandbox ended too many times; the remaining tests are not run")
            self.start(interface)

    def close(self) -> None:
        if self.box is not None:
            self.box.close()

    # -- requests made by proxies

    def request(self, header: dict, blobs=()) -> tuple[dict, list]:
        if self.broken:
            raise SandboxDied(self.broken)
        if self.box is None or not self.box.alive:
            raise SandboxDied("the sandbox is not running (it ended earlier in this test)")
        try:
            return self.box.request(header, blobs, timeout=self._t())
        except SandboxError as err:
            self.broken = f"your code stopped the sandbox: {err}"
            raise SandboxDied(self.broken) from None

    def decode(self, node, blobs, device=None):
        return _checked(lambda: wire.Decoder(blobs, ref=self._proxy_for, device=device).decode(node))

    def _proxy_for(self, ident: int, node: dict):
        kind = node.get("kind") if node.get("kind") in ("callable", "class", "object") else "object"
        name = str(node.get("name", "object"))[:80]
        return RemoteObject(self, self.generation, ident, kind, name)


def _checked(thunk):
    try:
        return thunk()
    except wire.WireError as err:
        raise AssertionError(f"your code returned something the grader cannot read: {err}") from None
    except (ValueError, TypeError, RuntimeError, MemoryError, OverflowError) as err:
        raise AssertionError(f"your code returned something the grader cannot read ({type(err).__name__})") from None


class RemoteObject:
    """A student's function, class or object living in the sandbox; calls and attributes go there."""

    __slots__ = ("_session", "_generation", "_ident", "_kind", "_name")

    def __init__(self, session: Session, generation: int, ident: int, kind: str, name: str):
        self._session, self._generation, self._ident = session, generation, ident
        self._kind, self._name = kind, name

    def _check(self):
        if self._generation != self._session.generation:
            raise SandboxDied(f"{self._name} belongs to a sandbox that has ended")

    def __call__(self, *args, **kwargs):
        self._check()
        return _remote_call(self._session, self._ident, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._check()
        reply, blobs = self._session.request({"op": "getattr", "ref": self._ident, "name": name})
        if "error" in reply:
            raise _error_of(reply)
        return self._session.decode(reply.get("value"), blobs)

    def __getitem__(self, key):
        """``obj[key]`` in the sandbox (a Triton kernel's ``kernel[grid]`` launcher, an element of a list)."""
        self._check()
        node, encoder = _encode_args((key,), {})
        reply, blobs = self._session.request({"op": "getitem", "ref": self._ident, "key": node}, encoder.blobs)
        if "error" in reply:
            raise _error_of(reply)
        return self._session.decode(reply.get("value"), blobs)

    def __repr__(self):
        return f"<student's {self._name}>"


def _error_of(reply) -> BaseException:
    err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    return _student_exception(
        str(err.get("type", "RuntimeError")), str(err.get("message", ""))[:4000], err.get("frames")
    )


def _encode_args(args, kwargs):
    def other(obj):
        if isinstance(obj, RemoteObject):
            return {"t": "ref", "id": obj._ident}
        raise wire.WireError(f"a {type(obj).__qualname__} cannot be passed to the student's function")

    encoder = wire.Encoder(other=other)
    return encoder.encode((tuple(args), dict(kwargs))), encoder


def _remote_call(session: Session, ident: int, args, kwargs):
    node, encoder = _encode_args(args, kwargs)
    sent = encoder.tensors
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in sent)
    header = {"op": "call", "ref": ident, "args": node, "grad": wants_grad}
    if not wants_grad:
        reply, blobs = session.request(header, encoder.blobs)
        return _finish_call(session, reply, blobs, sent)[0]
    grad_inputs = [t for t in sent if t.requires_grad]
    box = {}
    outputs = _RemoteFunction.apply(session, header, encoder.blobs, sent, box, *grad_inputs)
    return box["rebuild"](outputs)


def _finish_call(session, reply, blobs, sent):
    """Decode a call's reply, copy changed tensor arguments back; returns (result, decoder)."""
    if "error" in reply:
        raise _error_of(reply)
    decoder = wire.Decoder(blobs, ref=session._proxy_for)
    value = _checked(lambda: decoder.decode(reply.get("value")))
    if not isinstance(value, dict) or set(value) != {"result", "changed"}:
        raise AssertionError("the sandbox answered a call with something that is not a result")
    for item in value["changed"] if isinstance(value["changed"], list) else []:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int) and 0 <= item[0] < len(sent):
            original, new = sent[item[0]], item[1]
            if isinstance(new, torch.Tensor):
                with torch.no_grad():
                    if new.shape == original.shape and new.dtype == original.dtype:
                        original.copy_(new)
                    else:
                        original.data = new.to(original.device)
    return value["result"], decoder


class _RemoteFunction(torch.autograd.Function):
    """A call into the sandbox as one autograd node: backward asks the sandbox for the input gradients."""

    @staticmethod
    def forward(ctx, session, header, blobs, sent, box, *grad_inputs):
        reply, reply_blobs = session.request(header, blobs)
        result, decoder = _finish_call(session, reply, reply_blobs, sent)
        flags = reply.get("grad_outputs") if isinstance(reply.get("grad_outputs"), list) else []
        tensors = decoder.tensors
        differentiable = [
            i for i, t in enumerate(tensors) if i < len(flags) and flags[i] is True and t.is_floating_point()
        ]
        ctx.session, ctx.graph, ctx.n_inputs = session, reply.get("graph"), len(grad_inputs)
        ctx.devices = [t.device for t in grad_inputs]
        ctx.differentiable = differentiable
        outs = [tensors[i].detach() for i in differentiable]
        ids = {id(tensors[i]): k for k, i in enumerate(differentiable)}

        def rebuild(outputs, value=result):
            def swap(v):
                if isinstance(v, torch.Tensor) and id(v) in ids:
                    return outputs[ids[id(v)]]
                if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
                    return type(v)(swap(x) for x in v)
                if isinstance(v, dict):
                    return {k: swap(x) for k, x in v.items()}
                return v

            return swap(value)

        box["rebuild"] = rebuild
        return tuple(outs) if outs else (torch.zeros(()),)

    @staticmethod
    def backward(ctx, *grads):
        none = (None,) * 5
        if ctx.graph is None or not ctx.differentiable:
            return none + (None,) * ctx.n_inputs
        encoder = wire.Encoder()
        node = encoder.encode(list(grads[: len(ctx.differentiable)]))
        reply, blobs = ctx.session.request({"op": "backward", "graph": ctx.graph, "grads": node}, encoder.blobs)
        if "error" in reply:
            raise _error_of(reply)
        result = ctx.session.decode(reply.get("value"), blobs)
        if not isinstance(result, list) or len(result) != ctx.n_inputs:
            raise AssertionError("the sandbox answered a gradient request with something that is not gradients")
        return none + tuple(
            g.to(d) if isinstance(g, torch.Tensor) else None for g, d in zip(result, ctx.devices, strict=True)
        )


# ------------------------------------------------------------------------------------------ the grader


@dataclasses.dataclass
class TestResult:
    grade_id: str
    passed: bool
    stdout: str
    error: dict | None  # {"ename", "evalue"} shown to the student


@dataclasses.dataclass
class GradedNotebook:
    """What the trusted run found: per-test results, the notebook to record, and what went wrong."""

    notebook: nbformat.NotebookNode
    tests: list[TestResult]
    problems: list[str]
    seconds: float


class _CellTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _CellTimeout()


def _hidden_lines(source: str) -> range:
    lines = source.splitlines()
    begin = next((i + 1 for i, line in enumerate(lines) if HIDDEN_BEGIN in line), None)
    end = next((i + 1 for i, line in enumerate(lines) if HIDDEN_END in line), len(lines))
    return range(begin, end + 1) if begin else range(0)


def _describe(exc: BaseException, filename: str, hidden: range) -> dict:
    """What the student sees of a failed test: the exception and its message, never hidden code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    in_hidden = bool(frames) and frames[-1].lineno in hidden
    name = type(exc).__name__
    if isinstance(exc, StudentError):
        if in_hidden:
            return {"ename": name, "evalue": f"your code raised {name} on the hidden tests' inputs"}
        where = "".join(f"\n  {f}" for f in exc.frames)
        return {"ename": name, "evalue": f"{str(exc)[:2000]}" + (f"\n(in your code:{where})" if where else "")}
    if isinstance(exc, _CellTimeout):
        return {"ename": "TimeoutError", "evalue": "the test ran past its time limit"}
    message = str(exc)
    if len(message) > 2000:
        message = message[:2000] + " [cut]"
    return {"ename": name, "evalue": message}


class TrustedGrader:
    """Grade submissions of one assignment through the trusted path.

    Args:
        master: the assignment's master notebook.
        view: the library the sandbox sees (functions the hidden tests forbid taken out).
        limits: the sandbox's limits.
        slot: worker slot (see :class:`~quantcourse.grading.sandbox.Sandbox`).
        timeout: seconds one submission may take in all.
    """

    def __init__(
        self,
        master: Master,
        view: LibraryView,
        limits: Limits,
        *,
        slot: int = 0,
        timeout: float = 900,
        isolate: bool = True,
    ):
        """``isolate=False`` runs the student's code in a plain process (trusted notebooks only)."""
        self.master, self.view, self.limits, self.slot, self.timeout = master, view, limits, slot, timeout
        self.isolate = isolate

    def interface(self) -> list[str]:
        return list(dict.fromkeys(n for c in self.master.cells if c.kind == "answer" for n in c.names))

    def grade(self, submission) -> GradedNotebook:
        """Grade ``submission`` (a notebook node, or ``None`` for an empty one)."""
        started = time.monotonic()
        program = canonical_program(self.master, submission)
        session = Session(program, self.view, self.limits, self.slot, deadline=started + self.timeout)
        session.isolate = self.isolate
        interface = self.interface()
        tests: list[TestResult] = []
        try:
            try:
                session.start(interface)
            except SandboxError as err:
                session.problems.append(f"the sandbox did not run: {err}")
            tests = self._run_tests(session, interface)
        finally:
            session.close()
        notebook = self._record(program, session, tests)
        return GradedNotebook(notebook, tests, session.problems, time.monotonic() - started)

    def _namespace(self, session: Session, interface: list[str]) -> dict:
        namespace = {"__name__": "__main__"}
        for name, node in session.names.items():
            if name not in interface:
                continue
            if isinstance(node, dict) and node.get("t") == "ref":
                namespace[name] = session._proxy_for(int(node.get("id", 0)), node)
            else:
                namespace[name] = node
        return namespace

    def _run_tests(self, session: Session, interface: list[str]) -> list[TestResult]:
        random.seed(0)
        torch.manual_seed(0)
        namespace = self._namespace(session, interface)
        results = []
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        try:
            for cell in self.master.cells:
                if cell.kind == "locked":
                    self._exec(cell.source, f"<locked {cell.grade_id}>", namespace)
                elif cell.kind == "answer":
                    imports = _imports(cell.source)
                    if imports:
                        self._exec(imports, f"<imports {cell.grade_id}>", namespace)
                elif cell.kind == "test":
                    results.append(self._test(cell, session, interface, namespace))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        return results

    def _exec(self, source: str, filename: str, namespace: dict) -> BaseException | None:
        try:
            exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the master's own code
        except Exception as exc:  # noqa: BLE001
            return exc
        return None

    def _test(self, cell: MasterCell, session: Session, interface, namespace) -> TestResult:
        session.broken = None
        if session.box is None or not session.box.alive:
            try:
                session.ensure(interface)
                namespace.update(self._namespace(session, interface))
            except (SandboxError, SandboxDied) as err:
                return TestResult(cell.grade_id, False, "", {"ename": "SandboxError", "evalue": str(err)})
        filename = f"<test {cell.grade_id}>"
        out = io.StringIO()
        error = None
        left = max(1, int(min(self.limits.call_timeout * 4, session.deadline - time.monotonic())))
        signal.alarm(left)
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(cell.source, filename, "exec"), namespace)  # noqa: S102 - the master's own tests
        except (Exception, _CellTimeout) as exc:  # noqa: BLE001
            error = _describe(exc, filename, _hidden_lines(cell.source))
            if isinstance(exc, _CellTimeout) or (isinstance(exc, StudentError) and isinstance(exc, TimeoutError)):
                session.problems.append(f"{cell.grade_id}: the student's code ran past the time limit")
        finally:
            signal.alarm(0)
        if session.broken:
            session.problems.append(
                f"{cell.grade_id}: {session.broken.removeprefix('your code stopped the sandbox: ')}"
            )
            if error is None:
                error = {"ename": "SandboxError", "evalue": session.broken}
        stdout = out.getvalue()
        return TestResult(cell.grade_id, error is None, stdout[:20000], error)

    def _record(self, program, session: Session, tests: list[TestResult]) -> nbformat.NotebookNode:
        """The master notebook with the student's answers and outputs made here (nothing else)."""
        nb = copy.deepcopy(self.master.nb)
        answers: dict[str, tuple[str, dict]] = {}
        for position, (_, source, grade_id) in enumerate(program):
            if grade_id is not None:
                answers[grade_id] = (source, session.cell_results.get(position, {}))
        by_test = {t.grade_id: t for t in tests}
        for cell in nb.cells:
            grade_id = _nbgrader(cell).get("grade_id")
            if cell.cell_type != "code":
                continue
            cell.outputs, cell.execution_count = [], None
            meta = _nbgrader(cell)
            if meta.get("solution") and grade_id:
                source, result = answers.get(grade_id, ("# (no answer cell was submitted)", {}))
                cell.source = source
                cell.outputs = _stream_outputs(result)
                err = result.get("error") if isinstance(result, dict) else None
                if isinstance(err, dict):
                    cell.outputs.append(
                        nbformat.v4.new_output(
                            "error",
                            ename=str(err.get("type", "Error")),
                            evalue=str(err.get("message", ""))[:2000],
                            traceback=[f"{err.get('type', 'Error')}: {str(err.get('message', ''))[:2000]}"],
                        )
                    )
            elif meta.get("grade") and grade_id in by_test:
                test = by_test[grade_id]
                if test.stdout:
                    cell.outputs.append(nbformat.v4.new_output("stream", name="stdout", text=test.stdout))
                if test.error:
                    cell.outputs.append(
                        nbformat.v4.new_output(
                            "error",
                            ename=test.error["ename"],
                            evalue=test.error["evalue"],
                            traceback=[f"{test.error['ename']}: {test.error['evalue']}"],
                        )
                    )
        return nb


def _stream_outputs(result) -> list:
    outputs = []
    if not isinstance(result, dict):
        return outputs
    for name in ("stdout", "stderr"):
        text = result.get(name)
        if isinstance(text, str) and text:
            outputs.append(nbformat.v4.new_output("stream", name=name, text=text[:20000]))
    return outputs
