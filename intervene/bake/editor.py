"""The weight editor: collects affine edits at residual locations, then folds them into weights.

Every edit a baker can express is an affine map of an activation: ``y -> P y + c`` with ``P``
the identity, ``I - r rᵀ`` (``r`` a unit vector) or, at a writer's input or output only, ``I - L R``
(low rank, ``L`` ``[n, k]``, ``R`` ``[k, n]``: LEACE's oblique projection, a LoReFT / DiReFT). Edits of a writer's
*output* fold as ``W <- P W, b <- P b + c``; edits of its *input* fold as ``W <- W P, b <- b + W c``, applied in
reverse hook order so that ``W T_k(...T_1(x))`` comes out right.

Recording and :meth:`WeightEditor.plan` only read the source model, so every refusal comes before
any copy. :meth:`WeightEditor.finish` then writes into the copy one tensor at a time: each new
value is computed in float64 beside the old one, cast to the model's dtype, checked to be finite,
and only then copied in (cf. PEFT's ``safe_merge``).
"""

from __future__ import annotations

import copy
from typing import overload

import torch
from torch import nn

from intervene.bake.layout import (
    Layout,
    Loc,
    Part,
    get_flag,
    last_writer,
    layout_of,
    plain_problem,
    proj_paths,
    set_flag,
    skeleton,
    writer_paths,
)
from intervene.bake.records import BakeReport, Op, Plan, Units, Writer
from intervene.errors import NotBakeableError
from intervene.sites import hidden_size, num_layers
from intervene.sites.discovery import config_of
from intervene.sites.probe import input_embeddings, weight_of
from intervene.sites.residual import gain_tensor


class WeightEditor:
    """Collects edits from bakers against ``source``, then writes them into a copy of it.

    Recording touches nothing, so a refusal costs no copy of the model.

    Bakers call :meth:`add`, :meth:`project` and :meth:`project_residual`; vectors are ``[hidden]``
    for residual locations and ``[in_features]`` for ``"in"`` locations.
    """

    def __init__(self, source: nn.Module, n_interventions: int = 1) -> None:
        self.source = source  # where the sites were resolved; edits are recorded against it
        self.model = source  # until finish(target) points it at the copy being written
        self.layout: Layout = layout_of(source)
        self.n_layers = num_layers(source)
        self.hidden = hidden_size(source)
        self.n_interventions = n_interventions
        self.report = BakeReport()
        self._out: dict[tuple[int, Part], list[Op]] = {}
        self._in: dict[tuple[int, Part], list[Op]] = {}
        self._embed: list[Op] = []
        self._plan: Plan | None = None

    # ---- what bakers call ----------------------------------------------------------------------
    def add(self, loc: Loc, vector: torch.Tensor, why: str) -> None:
        """Add ``vector`` at ``loc`` (at every position)."""
        self._push(loc, Op(None, vector.detach().to(torch.float64).reshape(-1), loc.order, why))

    def project(self, loc: Loc, direction: torch.Tensor, value: float | None, why: str) -> None:
        """``h <- h - (h·r) r (+ value r)`` at ``loc``; ``direction`` must be a unit vector."""
        r = direction.detach().to(torch.float64).reshape(-1)
        if loc.kind == "resid":
            raise NotBakeableError(f"{why}: projecting the residual stream at one point is not a local weight "
                                   "edit (see DirectionalAblation's residual-stream bake)")
        self._push(loc, Op(r, None if value is None else value * r, loc.order, why))

    def erase(self, loc: Loc, left: torch.Tensor, right: torch.Tensor, mean: torch.Tensor | None, why: str) -> None:
        """``h <- (I - L R) h + L R μ`` (LEACE's eraser: ``left`` ``[n, k]``, ``right`` ``[k, n]``, ``mean``
        ``[n]`` or ``None``) at a writer's input or output; a residual point or the embedding refuses."""
        if loc.kind not in ("in", "write"):
            raise NotBakeableError(f"{why}: an oblique projection of the residual stream is not a weight edit (the "
                                   "skip connections carry it past every writer, whose weights cannot project it); "
                                   "bake it at a linear layer's input or a writer's output, e.g. layers.{i}.heads")
        lo, ro = (t.detach().to(torch.float64) for t in (left, right))
        c = None if mean is None else lo @ (ro @ mean.detach().to(torch.float64).reshape(-1))
        self._push(loc, Op(None, c, loc.order, why, lr=(lo, ro)))

    def low_rank(self, loc: Loc, left: torch.Tensor, right: torch.Tensor, vector: torch.Tensor | None,
                 why: str) -> None:
        """``h <- (I - L R) h + c`` at a writer's input or output: any low-rank affine edit (``left`` ``[n, k]``,
        ``right`` ``[k, n]``, ``vector`` ``c`` ``[n]`` or ``None``), e.g. a LoReFT ``h + P((W - Pᵀ) h + b)`` (``L = -P``,
        ``R = W - Pᵀ``, ``c = P b``). A residual point or the embedding refuses (the skip connections carry ``h``
        past every weight)."""
        if loc.kind not in ("in", "write"):
            raise NotBakeableError(f"{why}: a matrix edit of the residual stream is not a weight edit (the skip "
                                   "connections carry it past every weight); bake it at a linear layer's input or a "
                                   "writer's output, e.g. layers.{i}.heads")
        lo, ro = (t.detach().to(torch.float64) for t in (left, right))
        if lo.ndim != 2 or ro.ndim != 2 or lo.shape[1] != ro.shape[0] or lo.shape[0] != ro.shape[1]:
            raise NotBakeableError(f"{why}: L {tuple(lo.shape)} and R {tuple(ro.shape)} are not [n, k] and [k, n]")
        c = None if vector is None else vector.detach().to(torch.float64).reshape(-1)
        if c is not None and c.numel() != lo.shape[0]:
            raise NotBakeableError(f"{why}: a vector of {c.numel()} elements for a {lo.shape[0]}-wide edit")
        self._push(loc, Op(None, c, loc.order, why, lr=(lo, ro)))

    def project_residual(self, direction: torch.Tensor, why: str) -> None:
        """Make the residual stream orthogonal to ``direction`` everywhere: project the embedding
        output and the output of every attention and MLP writer of every block."""
        r = direction.detach().to(torch.float64).reshape(-1)
        if any(self.layout.arithmetic(self.source, i).post_norm for i in range(self.n_layers)):
            raise NotBakeableError(f"{why}: the blocks are post-LN, so the residual stream is a norm's output and no "
                                   "projection of the writers keeps it orthogonal to r")
        for i in range(self.n_layers):
            if (problem := plain_problem(self.layout.arithmetic(self.source, i))) is not None:
                raise NotBakeableError(f"{why}: block {i} {problem}, so projecting its attention and MLP writers "
                                       "does not keep the residual stream orthogonal to r")
        self._push(Loc("embed"), Op(r, None, 9, why))
        for i in range(self.n_layers):
            for part in ("attn", "mlp"):
                self._push(Loc("write", i, part), Op(r, None, 9, why))

    def _push(self, loc: Loc, op: Op) -> None:
        if loc.kind == "embed":
            if (why := self.layout.embed_problem(self.model)) is not None:
                raise NotBakeableError(f"{op.why}: {why}")
            if op.r is not None and self.layout.embed_offset is not None:
                raise NotBakeableError(f"{op.why}: {self.layout.embed_offset}")
            self._check_width(op, self.hidden)
            self._embed.append(op)
        elif loc.kind in ("write", "resid"):
            self._check_width(op, self.hidden)
            key = self._block_of(loc, op)
            if loc.kind == "resid":
                key, op = self._last_writer(key[0], op)
            self._out.setdefault(key, []).append(op)
        else:
            self._in.setdefault(self._block_of(loc, op), []).append(op)

    def _last_writer(self, layer: int, op: Op) -> tuple[tuple[int, Part], Op]:
        """The residual after block ``layer`` is what its last writer added to: ``(that writer, the edit in
        its units)``. The MLP, or the one branch of a block that has no MLP (a Mamba block)."""
        parts = self.layout.arithmetic(self.source, layer)
        part, why = last_writer(parts, layer)
        if part is None:
            raise NotBakeableError(f"{op.why}: {why}")
        gain = parts.attn_gain if part == "attn" else parts.mlp_gain
        if gain != 1.0 and op.c is not None:  # the block scales the writer's output (per channel, maybe)
            op = Op(op.r, op.c / gain_tensor(gain, op.c.numel()), op.order, op.why, op.seq)
        return (layer, part), op

    @staticmethod
    def _block_of(loc: Loc, op: Op) -> tuple[int, Part]:
        """``(layer, part)`` of the writer a block location edits (the residual after a block: its MLP)."""
        part: Part | None = "mlp" if loc.kind == "resid" else loc.part
        if loc.layer is None or part is None:
            raise NotBakeableError(f"{op.why}: a {loc.kind!r} location needs a block"
                                   f"{'' if loc.kind == 'resid' else ' and a part'}; got {loc}")
        return loc.layer, part

    def _check_width(self, op: Op, width: int) -> None:
        for t in (op.r, op.c):
            if t is not None and t.numel() != width:
                raise NotBakeableError(f"{op.why}: a vector of {t.numel()} elements at a point of width {width}")
        if op.lr is not None and (op.lr[0].shape[0] != width or op.lr[1].shape[-1] != width):
            raise NotBakeableError(f"{op.why}: a projection of width {op.lr[0].shape[0]} at a point of width {width}")

    # ---- folding -------------------------------------------------------------------------------
    def _units(self) -> Units:
        """``{module path: ((layer, part), input edits, output edits)}``: input edits fold into the
        projection, output edits into the writer (one module unless the writer is a post-norm)."""
        units: Units = {}
        for key in sorted(set(self._out) | set(self._in)):
            i, part = key
            if self._out.get(key):
                units.setdefault(writer_paths(self.source, i)[part], (key, [], []))[2].extend(self._out[key])
            if self._in.get(key):
                path = proj_paths(self.source, i)[part] or writer_paths(self.source, i)[part]
                units.setdefault(path, (key, [], []))[1].extend(self._in[key])
        return units

    def plan(self) -> None:
        """Read-only pass over ``source``: decide which module adds each constant and which config
        flags must create biases. Every refusal about biases is raised here, before any copy."""
        self._plan = self._make_plan()

    def _make_plan(self) -> Plan:
        units = self._units()
        shift: dict[str, torch.Tensor] = {}  # constants moved in from a parallel partner
        drop: set[str] = set()  # writers whose constant moved out
        flags: dict[str, str] = {}
        for path, (key, ins, outs) in list(units.items()):
            w, _, b, why = self._fold(self.source, path, ins, outs)
            if w.bias is not None or not bool(torch.count_nonzero(b)):
                continue
            if why is None:  # b is nonzero only once an edit added a constant, which _fold names
                raise NotBakeableError(f"{path}: the weight editor has a constant to add but no edit adding it")
            i, part = key
            if (flag := self._bias_flag(w, part)) is not None:
                flags.setdefault(flag, why)
                continue
            other: Part = "attn" if part == "mlp" else "mlp"
            if self.layout.is_parallel(config_of(self.source)) and path == writer_paths(self.source, i)[part]:
                # both writers add to the same residual point: the partner may add the constant
                opath = writer_paths(self.source, i)[other]
                try:
                    ow = Writer(self.source, opath, self.hidden)
                except NotBakeableError:
                    ow = None
                oflag = None if ow is None else self._bias_flag(ow, other)
                if ow is not None and (ow.bias is not None or oflag is not None):
                    gains = self.layout.arithmetic(self.source, i)
                    ratio = gain_tensor(getattr(gains, f"{part}_gain"), b.numel()) / gain_tensor(
                        getattr(gains, f"{other}_gain"), b.numel())
                    b = b * ratio.to(b.device)  # in the partner's units
                    shift[opath] = shift[opath] + b if opath in shift else b
                    drop.add(path)
                    units.setdefault(opath, ((i, other), [], []))
                    if ow.bias is None and oflag is not None:  # (no bias: then the partner has a flag)
                        flags.setdefault(oflag, why)
                    continue
            raise NotBakeableError(self._no_bias_message(w, part, why))
        return units, shift, drop, flags

    def finish(self, target: nn.Module) -> BakeReport:
        """Fold every collected edit into ``target`` (a private copy of ``source``: same module
        paths), one tensor at a time; returns what changed."""
        if self._plan is None:
            self._plan = self._make_plan()
        units, shift, drop, flags = self._plan
        self.model = target
        for flag, why in flags.items():
            self._enable_flag(flag, why)
        for path, (_, ins, outs) in units.items():
            w, wt, b, _ = self._fold(target, path, ins, outs)
            if path in drop:
                b = torch.zeros_like(b)
            if path in shift:
                b = b + shift[path].to(b.device)
            self._write(w.weight_name, w.param, w.stored(wt))
            if w.bias is not None:
                self._write(f"{w.path}.bias", w.bias, b)
            elif bool(torch.count_nonzero(b)):
                raise AssertionError(f"planned constant for {w.path} has no bias to go to")
            del wt, b  # keep one writer's float64 copy alive at a time
        self._fold_embed()
        self._verify_loadable()
        return self.report

    def _write(self, name: str, param: torch.Tensor, new: torch.Tensor) -> None:
        """Cast ``new`` to ``param``'s dtype, refuse non-finite values, then write it in place."""
        if torch.equal(param.detach().to(torch.float64), new):
            return
        val = new.to(param.dtype)
        if not bool(torch.isfinite(val).all()):
            raise NotBakeableError(f"baking produced non-finite values in {name} ({param.dtype}); the edit is too "
                                   "large for this dtype")
        with torch.no_grad():
            param.copy_(val)
        self.report.edited.append(name)

    def _fold(self, model: nn.Module, path: str, ins: list[Op],
              outs: list[Op]) -> tuple[Writer, torch.Tensor, torch.Tensor, str | None]:
        """(module at ``path``, folded weight ``[..., out, in]``, folded bias ``[out]``, first edit adding a constant)."""
        w = Writer(model, path, self.hidden)
        wt = w.weight64()
        b = w.bias.detach().to(torch.float64) if w.bias is not None else torch.zeros(wt.shape[-2], dtype=torch.float64,
                                                                                   device=wt.device)
        first_const = None
        for op in reversed(ins):  # input edits compose right to left
            if w.kind == "experts":
                raise NotBakeableError(f"{op.why}: the input of an MoE block is routed nonlinearly")
            r, c = self._dev(op.r, wt), self._dev(op.c, wt)
            if c is not None:
                self._check_width_in(op, c, wt)
                b = b + wt @ c
                first_const = first_const or op.why
            if r is not None:
                self._check_width_in(op, r, wt)
                wt = wt - (wt @ r)[..., None] * r
            if op.lr is not None:  # W (I - L R) = W - (W L) R
                lo, ro = (self._dev(t, wt) for t in op.lr)
                self._check_width_in(op, ro.new_empty(lo.shape[0]), wt)
                wt = wt - (wt @ lo) @ ro
        for op in sorted(outs, key=lambda o: (o.order, o.seq)):
            r, c = self._dev(op.r, wt), self._dev(op.c, wt)
            if r is not None:
                wt = wt - r[:, None] * torch.einsum("o,...oi->...i", r, wt)[..., None, :]
                b = b - r * (r @ b)
            if op.lr is not None:  # (I - L R) W, (I - L R) b
                lo, ro = (self._dev(t, wt) for t in op.lr)
                wt = wt - torch.einsum("ok,...ki->...oi", lo, torch.einsum("ko,...oi->...ki", ro, wt))
                b = b - lo @ (ro @ b)
            if c is not None:
                b = b + c
                first_const = first_const or op.why
        return w, wt, b, first_const

    @overload
    @staticmethod
    def _dev(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor: ...
    @overload
    @staticmethod
    def _dev(t: None, like: torch.Tensor) -> None: ...
    @staticmethod
    def _dev(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """``t`` in float64 on ``like``'s device (``None`` stays ``None``; a tensor is typed as one)."""
        return None if t is None else t.to(device=like.device, dtype=torch.float64)

    @staticmethod
    def _check_width_in(op: Op, t: torch.Tensor, wt: torch.Tensor) -> None:
        if t.numel() != wt.shape[-1]:
            raise NotBakeableError(f"{op.why}: a vector of {t.numel()} elements at an input of width {wt.shape[-1]}")

    def _bias_flag(self, w: Writer, part: Part) -> str | None:
        flag = self.layout.bias_flags.get(part)
        return flag if flag is not None and w.can_hold_bias and get_flag(config_of(self.model), flag) is not None else None

    def _no_bias_message(self, w: Writer, part: Part, why: str) -> str:
        cfg = type(config_of(self.model)).__name__
        mtype = config_of(self.model).model_type
        if w.kind == "experts":
            return (f"{why}: adds a constant to what the MoE block {w.path} writes; its experts have no bias "
                    f"and {cfg} has no flag creating one")
        hint = "mlp_bias" if part == "mlp" else "attention_bias"
        par = " (and the block is sequential, so no other writer can take it)" \
            if not self.layout.is_parallel(config_of(self.model)) else " (nor does its parallel partner)"
        return (f"{why}: adds a constant to what {w.path} writes, which has no bias{par}; {mtype}'s {cfg} has no "
                f"flag to create one (Llama-style configs call it `{hint}`), so vanilla from_pretrained could not "
                "load the baked bias")

    def _enable_flag(self, flag: str, why: str) -> None:
        cfg = config_of(self.model)
        if get_flag(cfg, flag) is True:
            raise NotBakeableError(f"{why}: {type(cfg).__name__}.{flag} is already True but the writer has no bias")
        new_cfg = copy.deepcopy(cfg)
        set_flag(new_cfg, flag, True)
        have = dict(self.model.named_parameters(remove_duplicate=False))
        want = dict(skeleton(self.model, new_cfg).named_parameters(remove_duplicate=False))
        added, lost = set(want) - set(have), set(have) - set(want)
        bad = sorted(k for k in added if not k.endswith(".bias"))
        if lost or bad:
            raise NotBakeableError(f"{why}: setting {type(cfg).__name__}.{flag}=True changes more than biases "
                                   f"(removes {sorted(lost)[:3]}, adds {bad[:3]})")
        for name in sorted(added):
            mod = self.model.get_submodule(name.rsplit(".", 1)[0])
            ref = weight_of(mod)
            if ref is None:
                raise NotBakeableError(f"{why}: setting {type(cfg).__name__}.{flag}=True adds {name}, whose module "
                                       "has no weight to take its dtype and device from")
            mod.bias = nn.Parameter(torch.zeros(want[name].shape, dtype=ref.dtype, device=ref.device),
                                    requires_grad=ref.requires_grad)
        set_flag(cfg, flag, True)
        self.report.config_flags[flag] = True
        self.report.created += sorted(added)

    def _fold_embed(self) -> None:
        if not self._embed:
            return
        emb = input_embeddings(self.model)
        weight = weight_of(emb)
        if weight is None:
            raise NotBakeableError(f"{type(self.model).__name__} has no input embedding weight to fold the edit into")
        scale = getattr(emb, "embed_scale", 1.0)
        scale = float(scale.item() if isinstance(scale, torch.Tensor) else scale)
        if self.layout.embed_gain is not None:  # measured: the row scale times any multiplier after it
            scale = self.layout.embed_gain
        e = weight.detach().to(torch.float64)
        pos_weight = None
        if self.layout.pos_embed:
            pos_weight = weight_of(self.model.get_submodule(self.layout.pos_embed))
            if pos_weight is None:
                raise NotBakeableError(f"the position embedding {self.layout.pos_embed} has no weight to fold the "
                                       "edit into")
        pos = pos_weight.detach().to(torch.float64) if pos_weight is not None else None
        for op in sorted(self._embed, key=lambda o: (o.order, o.seq)):
            r, c = self._dev(op.r, e), self._dev(op.c, e)
            if r is not None:
                e = e - (e @ r)[:, None] * r
                pos = None if pos is None else pos - (pos @ r)[:, None] * r
            if c is not None:
                e = e + c / scale  # the family multiplies the looked-up row by `scale`
        self._untie(weight)
        name = next(n for n, p in self.model.named_parameters() if p is weight)
        self._write(name, weight, e)
        if pos is not None and pos_weight is not None:
            self._write(f"{self.layout.pos_embed}.weight", pos_weight, pos)

    def _untie(self, weight: torch.Tensor) -> None:
        """Give the unembedding its own copy of the embedding ``weight`` when the two are tied."""
        get_output_embeddings = getattr(self.model, "get_output_embeddings", None)
        out = get_output_embeddings() if callable(get_output_embeddings) else None
        if not isinstance(out, nn.Module) or weight_of(out) is not weight:
            return
        # the unembedding must keep the original matrix: give it its own copy
        out.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        config = config_of(self.model)
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
        self.report.untied_embeddings = True
        self.report.config_flags["tie_word_embeddings"] = False

    def _verify_loadable(self) -> None:
        """The baked state dict must be exactly what vanilla from_pretrained expects for its config."""
        want = set(skeleton(self.model, config_of(self.model)).state_dict())
        have = set(self.model.state_dict())
        if want != have:
            raise NotBakeableError(f"the baked weights would not load with from_pretrained: missing "
                                   f"{sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}")
