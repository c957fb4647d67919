"""Run fuzz cases: copy a seed, mutate it, load it under guard, and judge the outcome.

For every case the harness asserts: a named error (an ``InterveneError``) or a correct load (see
:mod:`tests.fuzz.formats`); the expectation of the mutation honoured (``reject`` refused, ``same``
loaded identically); the model without hooks and with unchanged weights afterwards; nothing read or
written outside the case directory (an audit hook watches every ``open``, listing, rename, removal
and process spawn while the loader runs); no unpickled payload ran; and a time limit per case
(``SIGALRM`` interrupts a blocked read; ``faulthandler`` kills the process if even that fails).
"""

from __future__ import annotations

import faulthandler
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from intervene.errors import InterveneError
from tests.fuzz import mutate, mutate_fs
from tests.fuzz.formats import FORMATS, LOADERS, equal, reference
from tests.fuzz.seeds import Seed

LIMIT_S = 5.0  # a case that takes longer is a failure ("hang")
# How often each format comes up, and which mutations apply to it (repeated names weigh more).
WEIGHTS = {"diff": 6, "probe": 3, "sae": 4, "acts": 2, "latents": 2, "latents_resume": 1, "delphi": 2, "pyvene": 2,
           "gguf": 2}
COMMON = ["json", "json", "json", "json_raw", "bytes", "bytes", "tensor", "tensor", "fs", "fs", "extra"]
MUTATIONS = {fmt: COMMON for fmt in WEIGHTS} | {
    "diff": COMMON + ["interrupted"],
    "pyvene": ["json", "json", "json", "json_raw", "bytes", "bin", "bin", "bin", "fs", "fs", "extra"],
    "gguf": ["gguf", "gguf", "gguf", "bytes", "bytes", "fs", "extra"],
}
KINDS = {"json": mutate.json_structural, "json_raw": mutate.json_raw, "bytes": mutate.byte_level,
         "tensor": mutate.tensor_level, "fs": mutate_fs.fs_oddity, "extra": mutate_fs.fs_extra,
         "interrupted": mutate_fs.interrupted_save, "bin": mutate_fs.pyvene_bin, "gguf": mutate_fs.gguf_rewrite}
PAYLOAD = Path("/tmp/fuzz-payload-ran")
SPAWN = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty")
WRITE_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.truncate",
                "shutil.rmtree", "os.chown", "os.utime", "shutil.copyfile", "shutil.move")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case that ran too long."""


@dataclass
class _Guard:
    active: bool = False
    root: str = ""
    work: str = ""
    writes_ok: bool = False
    problems: list[str] = field(default_factory=list)

    def inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def path(self, p: Any) -> str | None:
        if isinstance(p, int) or p is None:
            return None
        try:
            p = os.fsdecode(os.fspath(p))
        except TypeError:
            return None
        return os.path.realpath(p)

    def read(self, real: str, event: str) -> None:
        outside_work = real.startswith(self.work + os.sep) and not self.inside(real)
        device = real.startswith("/dev/") and real not in ("/dev/null", "/dev/urandom", "/dev/shm")
        if outside_work or device or real == "/etc/passwd":
            self.problems.append(f"read outside the case: {event} {real}")

    def write(self, real: str, event: str) -> None:
        if self.inside(real) and self.writes_ok:
            return
        if "__pycache__" in real and real.endswith(".pyc"):
            return
        self.problems.append(f"wrote {'into the given directory' if self.inside(real) else 'outside the case'}: "
                             f"{event} {real}")


GUARD = _Guard()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    g = GUARD
    if not g.active:
        return
    if event == "open":
        real = g.path(args[0])
        if real is None:
            return
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        (g.write if writing else g.read)(real, event)
    elif event in ("os.listdir", "os.scandir"):
        real = g.path(args[0]) if args else None
        if real is not None:
            g.read(real, event)
    elif event in WRITE_EVENTS:
        for a in args[:2]:
            real = g.path(a)
            if real is not None and isinstance(a, (str, bytes, os.PathLike)):
                # these act on the name itself (unlink / rename a symlink, not its target)
                name = os.fsdecode(os.fspath(a))
                real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(name))), os.path.basename(name))
            if real is not None:
                g.write(real, event)
    elif event.startswith(SPAWN):
        g.problems.append(f"code ran: {event} {args!r:.120}")


_installed = False


def install() -> None:
    """Add the audit hook once per process (hooks cannot be removed; it costs nothing while inactive)."""
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout


@dataclass
class Result:
    index: int
    seed: str
    fmt: str
    mutation: str
    expect: str
    status: str  # named / loaded / raw / hang / wrong
    ok: bool
    message: str = ""
    seconds: float = 0.0


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _pick_seed(seeds: dict[str, Seed], i: int, rng: random.Random) -> Seed:
    order = [f for f, w in WEIGHTS.items() for _ in range(w)]
    fmt = order[i % len(order)]
    return rng.choice(sorted((s for s in seeds.values() if s.fmt == fmt), key=lambda s: s.name))


def _snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: its kind, mode and bytes (or link target)."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file() and st.st_mode & 0o400:
            out[rel] = ("file", p.read_bytes())
        else:
            out[rel] = ("other", st.st_mode)
    return out


def _cleanup(path: Path) -> None:
    for p in [path, *path.rglob("*")]:  # chmod 000 files and folders must be removable
        if not p.is_symlink():
            try:
                p.chmod(0o700 if p.is_dir() else 0o600)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def run_case(i: int, master: int, seeds: dict[str, Seed], work: Path, model: torch.nn.Module,
             baseline: dict[str, torch.Tensor], keep: bool = False) -> Result:
    rng = random.Random(f"{master}:{i}")
    seed = _pick_seed(seeds, i, rng)
    case = work / f"case-{i:06d}"
    root, outside = case / "given", case / "outside"
    shutil.copytree(seed.root, root, symlinks=True)
    outside.mkdir()
    kind = rng.choice(MUTATIONS[seed.fmt])
    mutation, expect = KINDS[kind](mutate.Case(seed, root, outside, rng))
    if _snapshot(root) == _snapshot(seed.root):
        expect = "same"  # the mutation changed nothing (a reshape to the same shape, a re-save...)
    if seed.fmt == "latents_resume" and expect == "reject":
        expect = "any"  # a resume may recompute what a bad record describes: its result must equal a clean run
    load, check = FORMATS[seed.fmt]
    hooks0 = _hooks(model)
    status, message, got = "loaded", "", None
    GUARD.root, GUARD.work, GUARD.problems = os.path.realpath(root), os.path.realpath(work), []
    GUARD.writes_ok = seed.fmt in ("latents_resume", "delphi")
    old = signal.signal(signal.SIGALRM, _alarm)
    faulthandler.dump_traceback_later(LIMIT_S + 30, exit=True)
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    GUARD.active = True
    try:
        got = load(seed, root, model)
        check(seed, root, got)
    except InterveneError as e:
        status, message = "named", f"{type(e).__name__}: {e}"
    except CaseTimeout:
        status, message = "hang", f"no answer within {LIMIT_S}s"
    except AssertionError as e:
        status, message = "wrong", f"accepted but wrong: {e}"
    except BaseException as e:  # noqa: BLE001 -- exactly what the suite looks for
        status, message = "raw", f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        GUARD.active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    problems = list(GUARD.problems)
    if status == "loaded" and expect == "reject":
        status, message = "wrong", "silently accepted (the format forbids this file)"
    elif status == "loaded" and expect.startswith("same"):
        other = expect.split(":", 1)[1] if ":" in expect else None
        if not equal(got, reference(seed, Path(other) if other else None)):
            status, message = "wrong", "loaded, but not what the unmodified file gives"
    elif status == "named" and expect.startswith("same"):
        status = "refused"  # a valid file refused: not unsafe, but wrong
    if _hooks(model) != hooks0:
        problems.append(f"hooks left on the model: {_hooks(model) - hooks0}")
    state = model.state_dict()
    if any(not torch.equal(state[k], v) for k, v in baseline.items()):
        problems.append("model weights changed")
    if PAYLOAD.exists():
        problems.append("an unpickled payload ran")
        PAYLOAD.unlink()
    if seconds > LIMIT_S:
        problems.append(f"took {seconds:.1f}s")
    ok = status in ("named", "loaded") and not problems
    if problems:
        message = "; ".join(problems) + (f" | {message}" if message else "")
    if ok or not keep:
        _cleanup(case)
    return Result(i, seed.name, seed.fmt, f"{kind}: {mutation}", expect, status, ok, message, seconds)


def run(n: int, master: int = 0, work: Path | None = None, keep: bool = False, progress: bool = False,
        start: int = 0) -> list[Result]:
    """Run cases ``start .. start + n`` with master seed ``master``; returns every result."""
    import tempfile

    from tests.fuzz.seeds import build, model

    install()
    work = Path(work or tempfile.mkdtemp(prefix="intervene-fuzz-"))
    seeds = build(work / "seeds")
    m = model()
    baseline = _model_state(m)
    for s in seeds.values():  # warm up: imports and references happen outside the guard
        reference(s)
    cases = work / "cases"
    cases.mkdir(exist_ok=True)
    out = []
    for i in range(start, start + n):
        r = run_case(i, master, seeds, cases, m, baseline, keep)
        out.append(r)
        if progress and (i + 1) % 100 == 0:
            bad = sum(not x.ok for x in out)
            print(f"  {i + 1 - start}/{n} cases, {bad} failures", file=sys.stderr, flush=True)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(results: list[Result]) -> str:
    """Case counts per format and loader, outcomes, timings, and every failure."""
    lines = [f"{'format':<16}{'loader':<24}{'cases':>7}{'named':>7}{'loaded':>7}{'failed':>7}{'max s':>7}"]
    for fmt in WEIGHTS:
        rs = [r for r in results if r.fmt == fmt]
        if not rs:
            continue
        c = Counter(r.status for r in rs)
        lines.append(f"{fmt:<16}{LOADERS[fmt]:<24}{len(rs):>7}{c['named']:>7}{c['loaded']:>7}"
                     f"{sum(not r.ok for r in rs):>7}{max(r.seconds for r in rs):>7.2f}")
    c = Counter(r.status for r in results)
    lines.append(f"{'total':<40}{len(results):>7}{c['named']:>7}{c['loaded']:>7}{sum(not r.ok for r in results):>7}")
    kinds = Counter(r.mutation.split(":")[0] for r in results)
    lines.append("mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    expect = Counter(r.expect.split(':')[0] for r in results)
    lines.append("expectations: " + ", ".join(f"{k} {v}" for k, v in sorted(expect.items())))
    for r in results:
        if not r.ok:
            lines.append(f"FAIL #{r.index} {r.seed} [{r.mutation}] expect={r.expect} -> {r.status}: {r.message[:400]}")
    return "\n".join(lines)
