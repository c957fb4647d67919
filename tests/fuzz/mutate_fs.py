"""File-system oddities and format-specific rewrites (interrupted saves, pyvene ``.bin``, GGUF)."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
from pathlib import Path

import torch

from tests.fuzz.mutate import Case, _files, _or_any, _pick, byte_level


def _outside_copy(c: Case, rel: str) -> Path:
    """A copy of the file outside the case directory (valid content: reading it would succeed)."""
    target = c.outside / f"{c.rng.randrange(10**9)}-{Path(rel).name}"
    shutil.copyfile(c.root / rel, target)
    return target


def _replace(c: Case, rel: str) -> None:
    p = c.root / rel
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def fs_oddity(c: Case) -> tuple[str, str]:
    rel = _pick(c)
    if rel is None:
        return "no file", "same"
    p = c.root / rel
    kind = c.rng.choice(["symlink_out", "symlink_out_rel", "symlink_in", "fifo", "device", "dir", "missing",
                         "unreadable", "loop", "dangling", "symlink_dir_out"])
    expect = _or_any(c, rel)
    if kind == "symlink_out":
        target = _outside_copy(c, rel)
        _replace(c, rel)
        p.symlink_to(target)
    elif kind == "symlink_out_rel":
        target = _outside_copy(c, rel)
        _replace(c, rel)
        p.symlink_to(os.path.relpath(target, p.parent))
    elif kind == "symlink_in":
        alias = p.with_name(f"alias-{p.name}.data")
        p.rename(alias)
        p.symlink_to(alias.name)
        expect = "same"
    elif kind == "fifo":
        _replace(c, rel)
        os.mkfifo(p)
    elif kind == "device":
        _replace(c, rel)
        try:
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless zeros
        except (PermissionError, OSError):
            p.symlink_to("/dev/zero")
    elif kind == "dir":
        _replace(c, rel)
        p.mkdir()
        (p / "inner.json").write_text("{}")
    elif kind == "missing":
        _replace(c, rel)
    elif kind == "unreadable":
        p.chmod(0)
        if os.geteuid() == 0:  # root reads anything: nothing changes for it
            expect = "same"
    elif kind == "loop":
        _replace(c, rel)
        p.symlink_to(p.name)
    elif kind == "dangling":
        _replace(c, rel)
        p.symlink_to("does-not-exist")
    else:  # a whole subfolder replaced by a symlink to an outside copy of it
        parent = Path(rel).parent
        if str(parent) == ".":
            target = _outside_copy(c, rel)
            _replace(c, rel)
            p.symlink_to(target)
        else:
            target = c.outside / f"dir-{c.rng.randrange(10**9)}"
            shutil.copytree(c.root / parent, target, symlinks=True)
            shutil.rmtree(c.root / parent)
            (c.root / parent).symlink_to(target, target_is_directory=True)
            expect = "reject" if any(f.startswith(f"{parent}/") for f in c.seed.required) else "any"
    return f"fs {kind} {rel}", expect


def fs_extra(c: Case) -> tuple[str, str]:
    """Files a loader must ignore: junk, a FIFO, symlinks leading out, temporaries of killed writes."""
    kind = c.rng.choice(["fifo", "symlink", "junk", "tmp", "staged", "device"])
    subdirs = sorted({str(Path(f).parent) for f in _files(c)})
    where = c.root / c.rng.choice(subdirs)
    if kind == "fifo":
        os.mkfifo(where / "extra.fifo")
    elif kind == "symlink":
        (where / "extra-link.txt").symlink_to("/etc/passwd")
    elif kind == "junk":
        (where / "notes.txt").write_bytes(os.urandom(100))
    elif kind == "device":
        try:
            os.mknod(where / "extra.dev", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        except (PermissionError, OSError):
            (where / "extra.dev").symlink_to("/dev/zero")
    else:  # what a killed write leaves behind
        f = c.rng.choice(_files(c))
        name = Path(f).name
        if kind == "staged" and c.seed.fmt == "diff":
            name = f".intervene_weights.{os.urandom(32).hex()}.safetensors"
        else:
            name = f".{name}.{os.urandom(8).hex()}.tmp"
        data = (c.root / f).read_bytes()
        (c.root / Path(f).parent / name).write_bytes(data[: len(data) // 2])
    # The tokenizer folder is handed to transformers, which may open any file there: a non-regular entry in it
    # is refused (any), elsewhere unknown entries are ignored (same).
    risky = kind in ("fifo", "symlink", "device") and where.name == "tokenizer"
    return f"extra {kind} in {where.relative_to(c.root)}", "any" if risky else "same"


# ---- a diff save killed at each step -------------------------------------------------------------------
def interrupted_save(c: Case) -> tuple[str, str]:
    """The states a save of the ``other`` diff over this one passes through, and the mix it must never allow."""
    new = c.seed.extra.get("other")
    if new is None:
        return fs_extra(c)
    cfg, w = "intervene_config.json", "intervene_weights.safetensors"
    sha = json.loads((new / cfg).read_text())["weights"]["sha256"]
    staged = f".intervene_weights.{sha}.safetensors"
    kind = c.rng.choice(["before_commit", "after_commit", "done", "mix", "mix_card", "tmp_only"])
    if kind == "before_commit":  # new weights staged, config not yet replaced: the old diff
        shutil.copyfile(new / w, c.root / staged)
        expect = "same"
    elif kind == "after_commit":  # new config, old weights, new weights staged: the new diff
        shutil.copyfile(new / w, c.root / staged)
        shutil.copyfile(new / cfg, c.root / cfg)
        expect = f"same:{new}"
    elif kind == "done":
        shutil.copyfile(new / w, c.root / w)
        shutil.copyfile(new / cfg, c.root / cfg)
        expect = f"same:{new}"
    elif kind == "mix":  # old config + new weights: what a per-file atomic save could leave
        shutil.copyfile(new / w, c.root / w)
        expect = "reject"
    elif kind == "mix_card":  # new config + old weights, nothing staged
        shutil.copyfile(new / cfg, c.root / cfg)
        expect = "reject"
    else:  # half-written temporaries of every file
        for f in (cfg, w, "README.md"):
            data = (new / f).read_bytes()
            (c.root / f".{f}.{os.urandom(8).hex()}.tmp").write_bytes(data[: len(data) // 3])
        expect = "same"
    return f"interrupted save: {kind}", expect


# ---- pyvene .bin files -----------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):  # never runs: weights_only refuses it
        return (os.system, ("echo FUZZ-PAYLOAD-RAN > /tmp/fuzz-payload-ran",))


def pyvene_bin(c: Case) -> tuple[str, str]:
    rel = _pick(c, ".bin")
    if rel is None:
        return byte_level(c)
    p = c.root / rel
    state = torch.load(p, weights_only=True)
    src = state["source_representation"]
    kind = c.rng.choice(["short", "long", "int", "nan", "empty", "extra", "embed", "inter0", "inter_half",
                         "list", "evil", "2d", "half", "scalar_src", "no_src"])
    expect = "reject"
    if kind == "short":
        state["source_representation"] = src[:-1].clone()
    elif kind == "long":
        state["source_representation"] = torch.cat([src, src[:3]])
    elif kind == "int":
        state["source_representation"] = src.to(torch.int64)
    elif kind == "nan":
        s = src.clone()
        s[0] = float("nan")
        state["source_representation"] = s
    elif kind == "empty":
        state["source_representation"] = torch.zeros(0)
    elif kind == "extra":
        state["fuzz"] = torch.zeros(2)
    elif kind == "embed":
        state["embed_dim"] = torch.tensor(src.numel() + 1)
    elif kind == "inter0":
        state["interchange_dim"] = torch.tensor(0)
    elif kind == "inter_half":
        state["interchange_dim"] = torch.tensor(src.numel() // 2)
        expect = "any"
    elif kind == "list":
        state = [src]
    elif kind == "evil":
        state["evil"] = _Evil()
    elif kind == "2d":
        state["source_representation"] = src[None].clone()
    elif kind == "half":
        state["source_representation"] = src.half()
        expect = "any"
    elif kind == "scalar_src":
        state["source_representation"] = src[:1].clone()
    else:
        del state["source_representation"]
    buf = io.BytesIO()
    torch.save(state, buf)
    p.write_bytes(buf.getvalue())
    return f"pyvene bin {kind} {rel}", expect


# ---- GGUF control vectors -------------------------------------------------------------------------------
def gguf_rewrite(c: Case) -> tuple[str, str]:
    import gguf
    import numpy as np

    rel = c.seed.extra["file"]
    kind = c.rng.choice(["dir0", "f16", "2d", "nan", "extra_name", "two_widths", "arch", "count", "none",
                         "hint", "beyond", "narrow", "int_count"])
    v = np.random.default_rng(c.rng.randrange(2**32)).standard_normal(32).astype(np.float32)
    tensors: dict[str, np.ndarray] = {"direction.1": v}
    arch, count, hint, expect = "controlvector", None, "llama", "reject"
    if kind == "dir0":
        tensors = {"direction.0": v}
    elif kind == "f16":
        tensors = {"direction.1": v.astype(np.float16)}
    elif kind == "2d":
        tensors = {"direction.1": v.reshape(2, 16)}
    elif kind == "nan":
        v[3] = np.nan
    elif kind == "extra_name":
        tensors["something.else"] = v
    elif kind == "two_widths":
        tensors["direction.2"] = v[:16].copy()
    elif kind == "arch":
        arch = "llama"
    elif kind == "count":
        count = 7
    elif kind == "none":
        tensors = {}
    elif kind == "hint":
        hint, expect = "mistral", "any"
    elif kind == "beyond":
        tensors = {"direction.5": v}
    elif kind == "narrow":
        tensors = {"direction.1": v[:31].copy()}
    else:
        count = 1
        expect = "any"
    w = gguf.GGUFWriter(str(c.root / rel), arch)
    w.add_string(f"{arch}.model_hint", hint)
    if count is not None:
        w.add_uint32(f"{arch}.layer_count", count)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f"gguf {kind}", expect
