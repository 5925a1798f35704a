"""Objectives for activation maximisation: what a synthesised image should excite.

An :class:`Objective` maps the activations captured at some layers (and, if needed, the logits) to one
value per image of the batch, shape (N,). Objectives add, subtract and scale::

    channel("bn2", 286) - 0.5 * channel("blocks.5.0", 3) + 0.1 * diversity("blocks.3.0")

and parse from strings (:func:`parse_objective`): ``LAYER:CH`` (mean of one channel over positions),
``LAYER:CH@Y,X`` (one neuron), ``LAYER`` (mean of squares of the whole layer, DeepDream),
``logit:CLASS`` (the pre-softmax score; a class index or a label, quoted when it has spaces), joined
with ``+``/``-`` and numeric weights (``0.5*bn2:3``). References: Erhan et al. 2009 (activation
maximisation), Simonyan et al. 2014 (class logits), Mordvintsev et al. 2015 (DeepDream), Olah et
al. 2017 (Feature Visualization: neurons, channels, directions, diversity).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import ConvscopeError, LayerNotFoundError, TargetError, suggestion
from ..models import as_model
from ..probe import layer_names

LOGITS = "<logits>"
"""Key under which the model's output (class scores) is passed to objective functions."""

ObjectiveFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class ObjectiveSyntaxError(ConvscopeError, ValueError):
    """An objective string that does not parse; the message shows the text with a caret at the fault."""

    def __init__(self, message: str, text: str, position: int):
        self.message, self.text, self.position = message, text, position
        super().__init__(f"{message} at column {position + 1} of the objective\n  {text}\n  {' ' * position}^")


class Objective:
    """A differentiable function of captured activations giving one value per image (N,).

    ``layers``: the layer names it reads; ``needs_logits``: whether it reads the model's output (then
    the forward pass cannot stop early). ``fn(acts)`` receives ``{layer: activation}`` plus
    ``acts[LOGITS]`` when ``needs_logits``. Objectives support ``+``, ``-``, ``*``/``/`` by numbers.
    """

    def __init__(self, fn: ObjectiveFn, layers: Sequence[str] = (), needs_logits: bool = False, name: str = "objective"):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.needs_logits = needs_logits
        self.name = name

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        value = self.fn(acts)
        return value

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    # -- algebra
    def _combine(self, other: Objective, sign: float) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        name = f"{self.name} {'+' if sign > 0 else '-'} {other.name}"
        return Objective(lambda a: self.fn(a) + sign * other.fn(a), self.layers + other.layers,
                         self.needs_logits or other.needs_logits, name)

    def __add__(self, other: Objective) -> Objective:
        return self._combine(other, 1.0)

    def __radd__(self, other: Any) -> Objective:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def __sub__(self, other: Objective) -> Objective:
        return self._combine(other, -1.0)

    def __mul__(self, w: float) -> Objective:
        if not isinstance(w, (int, float)):
            return NotImplemented
        w = float(w)
        return Objective(lambda a: w * self.fn(a), self.layers, self.needs_logits, f"{w:g}*{self.name}")

    __rmul__ = __mul__

    def __truediv__(self, w: float) -> Objective:
        return self * (1.0 / w)

    def __neg__(self) -> Objective:
        return self * -1.0


# ============================================================================ building blocks


def _spatial(a: torch.Tensor, layer: str) -> torch.Tensor:
    """Activations as (N, C, H, W): (N, C) vectors become 1x1 maps."""
    if a.ndim == 2:
        return a[:, :, None, None]
    if a.ndim != 4:
        raise ConvscopeError(f"layer {layer!r} outputs shape {tuple(a.shape)}; objectives need (N, C) or (N, C, H, W)")
    return a


def _check_channels(a: torch.Tensor, layer: str, channels: torch.Tensor) -> None:
    c = a.shape[1]
    bad = channels[(channels < 0) | (channels >= c)]
    if bad.numel():
        raise TargetError(f"channel {int(bad[0])} is out of range: layer {layer!r} has {c} channels (0..{c - 1})")


def _per_image(ch: int | Sequence[int], n: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor([ch] if isinstance(ch, int) else list(ch), dtype=torch.long)
    if idx.numel() == 1:
        return idx.expand(n)
    if idx.numel() != n:
        raise TargetError(f"{what}: {idx.numel()} indices for a batch of {n} images (give one, or one per image)")
    return idx


def channel(layer: str, ch: int | Sequence[int]) -> Objective:
    """Mean activation of channel ``ch`` of ``layer`` over all positions, per image.

    ``ch`` may be a sequence with one channel per image of the batch: image ``i`` then maximises channel
    ``ch[i]`` (batched rendering of many channels in one optimisation).
    """

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = _spatial(acts[layer], layer)
        idx = _per_image(ch, a.shape[0], "channel").to(a.device)
        _check_channels(a, layer, idx)
        return a[torch.arange(a.shape[0], device=a.device), idx].mean(dim=(1, 2))

    label = ch if isinstance(ch, int) else f"[{len(list(ch))} channels]"
    return Objective(fn, [layer], name=f"{layer}:{label}")


def neuron(layer: str, ch: int | Sequence[int], y: int | None = None, x: int | None = None) -> Objective:
    """Activation of one unit: channel ``ch`` at position (``y``, ``x``) (default: the centre)."""

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = _spatial(acts[layer], layer)
        idx = _per_image(ch, a.shape[0], "neuron").to(a.device)
        _check_channels(a, layer, idx)
        h, w = a.shape[2:]
        yy = h // 2 if y is None else y
        xx = w // 2 if x is None else x
        if not (0 <= yy < h and 0 <= xx < w):
            raise TargetError(f"position ({yy}, {xx}) is outside layer {layer!r}'s {h}x{w} map at this input size")
        return a[torch.arange(a.shape[0], device=a.device), idx, yy, xx]

    at = "" if y is None and x is None else f"@{y},{x}"
    return Objective(fn, [layer], name=f"{layer}:{ch}{at}")


def layer(name: str) -> Objective:
    """Mean of the squared activations of a whole layer (DeepDream's objective), per image."""

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = acts[name]
        return a.pow(2).flatten(1).mean(dim=1)

    return Objective(fn, [name], name=name)


def logit(cls: int | Sequence[int]) -> Objective:
    """The pre-softmax score of class ``cls`` (one class, or one per image)."""

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        z = acts[LOGITS]
        idx = _per_image(cls, z.shape[0], "logit").to(z.device)
        n = z.shape[1]
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.numel():
            raise TargetError(f"class index {int(bad[0])} is out of range: the model has {n} classes (0..{n - 1})")
        return z[torch.arange(z.shape[0], device=z.device), idx]

    return Objective(fn, [], needs_logits=True, name=f"logit:{cls}")


def direction(layer: str, vector: torch.Tensor | Sequence[float]) -> Objective:
    """Mean over positions of the projection of the activation vector on a unit ``vector`` (C,)."""
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    if not torch.isfinite(v).all() or float(v.norm()) == 0:
        raise ConvscopeError("direction: the vector must be finite and non-zero")
    v = v / v.norm()

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = _spatial(acts[layer], layer)
        if a.shape[1] != v.numel():
            raise TargetError(f"direction has {v.numel()} values but layer {layer!r} has {a.shape[1]} channels")
        return torch.einsum("nchw,c->nhw", a, v.to(a.device, a.dtype)).mean(dim=(1, 2))

    return Objective(fn, [layer], name=f"direction({layer})")


def diversity(layer: str) -> Objective:
    """Minus the mean cosine similarity of each image's Gram matrix to the others' (Olah et al. 2017).

    For a batch of N images with activations a_i (C, HW), G_i = a_i a_i^T; the value for image i is
    -(1/(N-1)) sum_{j != i} cos(G_i, G_j), computed for all pairs at once (one N x N matrix product).
    Adding ``w * diversity(layer)`` to an objective pushes the batch's samples apart. 0 for N = 1.
    """

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = _spatial(acts[layer], layer)
        n = a.shape[0]
        if n < 2:
            return a.new_zeros(n)
        f = a.flatten(2)
        g = torch.bmm(f, f.transpose(1, 2)).flatten(1)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = g @ g.T
        off = sim.sum(dim=1) - sim.diagonal()
        return -off / (n - 1)

    return Objective(fn, [layer], name=f"diversity({layer})")


def as_objective(obj: Objective | str, model: Any = None) -> Objective:
    """An :class:`Objective` as it is, or parsed from a string (checked against ``model`` when given)."""
    if isinstance(obj, Objective):
        return obj
    if isinstance(obj, str):
        return parse_objective(obj, model)
    raise ConvscopeError(f"an objective must be a string or an Objective, got {type(obj).__name__}")


# ============================================================================ the string syntax

_WORD = re.compile(r"[A-Za-z0-9_.]+")
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class _Parser:
    def __init__(self, text: str, model: Any):
        self.text = text
        self.pos = 0
        self.model = as_model(model) if model is not None else None
        self.names = set(layer_names(self.model.module)) if self.model is not None else None

    def fail(self, message: str, pos: int | None = None) -> ObjectiveSyntaxError:
        return ObjectiveSyntaxError(message, self.text, self.pos if pos is None else pos)

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def word(self, what: str) -> tuple[str, int]:
        self.skip()
        m = _WORD.match(self.text, self.pos)
        if not m:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
            raise self.fail(f"expected {what}, found {found}")
        self.pos = m.end()
        return m.group(0), m.start()

    def integer(self, what: str) -> int:
        w, start = self.word(what)
        if not w.isdigit():
            raise self.fail(f"expected {what} (a whole number), found {w!r}", start)
        return int(w)

    def parse(self) -> Objective:
        if not self.text.strip():
            raise self.fail("empty objective")
        total = self.term(1.0)
        while True:
            c = self.peek()
            if c == "":
                return total
            if c not in "+-":
                raise self.fail(f"expected '+', '-' or the end, found {c!r}")
            self.pos += 1
            total = total + self.term(1.0 if c == "+" else -1.0)

    def term(self, sign: float) -> Objective:
        weight = sign
        while self.peek() == "-":
            self.pos += 1
            weight = -weight
        atom: Objective | None = None
        while True:
            self.skip()
            m = _WORD.match(self.text, self.pos)
            start = self.pos
            after = self.text[m.end():].lstrip()[:1] if m else ""
            if m and _NUMBER.match(m.group(0)) and (after == "*" or (atom is not None)):
                self.pos = m.end()
                weight *= float(m.group(0))
            else:
                if atom is not None:
                    raise self.fail("a term holds one objective; join objectives with '+' or '-'", start)
                atom = self.atom()
            if self.peek() != "*":
                break
            self.pos += 1
        if atom is None:
            raise self.fail("expected an objective after the weight")
        return atom if weight == 1.0 else weight * atom

    def atom(self) -> Objective:
        name, start = self.word("a layer name or 'logit:CLASS'")
        if name == "logit" and self.peek() == ":":
            self.pos += 1
            return logit(self.class_index())
        if self.names is not None and name not in self.names:
            raise LayerNotFoundError(f"unknown layer {name!r} at column {start + 1} of the objective{suggestion(name, sorted(self.names))}")
        if self.peek() != ":":
            return layer(name)
        self.pos += 1
        ch = self.integer("a channel number after ':'")
        if self.peek() != "@":
            return channel(name, ch)
        self.pos += 1
        y = self.integer("a row after '@'")
        if self.peek() != ",":
            raise self.fail("expected ',' between the neuron's row and column")
        self.pos += 1
        x = self.integer("a column after ','")
        return neuron(name, ch, y, x)

    def class_index(self) -> int:
        self.skip()
        start = self.pos
        if self.peek() in "\"'":
            quote = self.text[self.pos]
            end = self.text.find(quote, self.pos + 1)
            if end < 0:
                raise self.fail("unterminated quoted class name")
            label = self.text[self.pos + 1:end]
            self.pos = end + 1
        else:
            label, start = self.word("a class index or name after 'logit:'")
        if self.model is None:
            if not label.isdigit():
                raise self.fail("class names need a model; give a class index", start)
            return int(label)
        return self.model.class_index(int(label) if label.isdigit() else label)


def parse_objective(text: str, model: Any = None) -> Objective:
    """Parse the objective syntax (see the module docstring) into an :class:`Objective`.

    With ``model``, layer names and class names are checked against it; a syntax error raises
    :class:`ObjectiveSyntaxError` whose message points at the column with a caret.
    """
    if not isinstance(text, str):
        raise ConvscopeError(f"an objective must be a string, got {type(text).__name__}")
    return _Parser(text, model).parse()

