"""Saves are atomic for the whole diff: ``kill -9`` at every step and at random moments, and two processes
saving into one directory, never leave a mix a reader can load, and the next save leaves no temporaries.
Saved files get the user's umask. Children are forked (no re-import) and every wait has a hard deadline,
so a stuck child fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import intervene as iv
from intervene.diff_format import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from intervene.errors import InterveneError
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                                reason="forks a child per kill point (Linux)")
DEADLINE_S = 60.0
_KILL_AT: list[int] = []  # set in a forked child only: kill yourself at that file-system event
_EVENTS = ("open", "os.rename", "os.remove", "os.chmod", "os.mkdir")


def _audit(event: str, args: tuple) -> None:
    if _KILL_AT and event in _EVENTS:
        _KILL_AT[0] -= 1
        if _KILL_AT[0] < 0:
            os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(_audit)  # inert unless _KILL_AT is set (it is only in children)


class _Stuck(BaseException):
    pass


@pytest.fixture(autouse=True)
def _hard_timeout():
    """The parent too has a deadline: a blocked lock or load raises instead of hanging CI."""
    def stuck(signum, frame):
        raise _Stuck(f"test exceeded {4 * DEADLINE_S}s")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(int(4 * DEADLINE_S))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _ivm(seed: int) -> iv.Intervenable:
    g = torch.Generator().manual_seed(seed)
    model = tiny_model("llama")
    return iv.Intervenable(model, [iv.Steering({"layers.1": torch.randn(32, generator=g)}, scale=2.0, name="s"),
                                   iv.DirectionalAblation(torch.randn(32, generator=g), sites="layers.0", name="a")],
                           attach=False)


def _vectors(ivm: iv.Intervenable) -> dict[str, torch.Tensor]:
    return {f"{x.name}.{k}": t for x in ivm.interventions for k, t in x.tensors().items()}


def _fork(body) -> int:
    pid = os.fork()
    if pid == 0:  # the child: run, then leave without running the parent's atexit / pytest machinery
        try:
            torch.set_num_threads(1)
            body()
            os._exit(0)
        except BaseException:
            os._exit(3)
    return pid


def _wait(pid: int, deadline: float = DEADLINE_S) -> int:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish within {deadline}s")


def _which(d: Path, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> str:
    """``old`` / ``new`` for what loads from ``d`` (anything else fails the test)."""
    got = _vectors(iv.Intervenable.load(d, tiny_model("llama"), attach=False))
    for name, want in (("old", old), ("new", new)):
        if got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got):
            return name
    raise AssertionError("a killed save left a mix that loads")


def _clean(d: Path) -> None:
    assert sorted(p.name for p in d.iterdir()) == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]), \
        f"left behind: {sorted(p.name for p in d.iterdir())}"


def test_kill_at_every_step_leaves_old_or_new(tmp_path: Path) -> None:
    old_ivm, new_ivm = _ivm(0), _ivm(1)
    old, new = _vectors(old_ivm), _vectors(new_ivm)
    d = tmp_path / "diff"
    seen, step = [], 0
    while True:
        old_ivm.save_pretrained(d)  # the previous case's leftovers are recovered / swept here
        _clean(d)

        def save(k: int = step) -> None:
            _KILL_AT[:] = [k]
            new_ivm.save_pretrained(d)

        status = _wait(_fork(save))
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        seen.append(_which(d, old, new))
        if not killed:  # the save got past every event: the last state is the new diff
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and seen[-1] == "new"
            break
        step += 1
        assert step < 200
    assert step > 5 and "old" in seen and "new" in seen[:-1], seen  # killed both before and after the commit
    print(f"killed at {step} steps: {seen.count('old')} left the old diff, {seen.count('new') - 1} the new one")
    new_ivm.save_pretrained(d)
    _clean(d)


def test_kill_at_random_moments(tmp_path: Path) -> None:
    ivms = [_ivm(0), _ivm(1)]
    want = [_vectors(x) for x in ivms]
    d = tmp_path / "diff"
    ivms[0].save_pretrained(d)
    rng = random.Random(0)
    seen = []
    for _ in range(25):
        def loop() -> None:
            i = 0
            while True:
                ivms[i % 2].save_pretrained(d)
                i += 1

        pid = _fork(loop)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        _wait(pid)
        seen.append(_which(d, want[0], want[1]))
    print(f"25 random kills: {seen.count('old')} left diff 0, {seen.count('new')} diff 1, no mix")
    ivms[1].save_pretrained(d)
    _clean(d)


def test_concurrent_saves_never_show_a_mix(tmp_path: Path) -> None:
    ivms = [_ivm(0), _ivm(1)]
    want = [_vectors(x) for x in ivms]
    d = tmp_path / "diff"
    ivms[0].save_pretrained(d)
    stop_at = time.monotonic() + 3.0

    def saver(i: int):
        def run() -> None:
            while time.monotonic() < stop_at:
                ivms[i].save_pretrained(d)
        return run

    pids = [_fork(saver(0)), _fork(saver(1))]
    loads = {"old": 0, "new": 0}
    errors = []
    try:
        while time.monotonic() < stop_at:
            try:
                loads[_which(d, want[0], want[1])] += 1
            except InterveneError as e:  # must not happen: loads take a shared lock
                errors.append(str(e))
    finally:
        for pid in pids:
            status = _wait(pid)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert not errors, errors[:3]
    assert loads["old"] + loads["new"] > 20, loads
    print(f"concurrent saves: {loads['old'] + loads['new']} loads ({loads}), 0 mixed, 0 errors")
    _clean(d)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from intervene import probes
    from intervene.features import save_sae
    from intervene.probes.synthetic import planted_features
    from tests.test_sae import rand_sae

    old = os.umask(umask)
    try:
        _ivm(0).save_pretrained(tmp_path / "diff")
        x, y, _ = planted_features(40, 4, seed=1)
        probes.MeanDiffProbe().fit(x, y).save(tmp_path / "probe")
        save_sae(rand_sae("topk"), tmp_path / "sae")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 7
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p, oct(p.stat().st_mode))
