"""The JSON API of the web explorer: one :class:`Explorer` per served model, no HTTP in here.

Every endpoint answers JSON. Errors are ``{"error": "one line"}`` with status 400 for input a user can
fix (any :class:`~convscope.errors.ConvscopeError`: unknown layer, method or image id, target out of
range, unreadable image, bad number), 404 for an unknown path, 405 for a known path with the wrong
HTTP method, 413 for an upload over the size limit and 500 (one line, never a traceback) for bugs.
Pictures travel as ``data:image/png;base64,...`` strings inside the JSON.

``IMAGE`` below is an image id: what ``POST /api/image`` returned, or ``sample:NAME`` for a bundled
sample. ``LAYER`` is a layer name as ``/api/info`` lists it; where it is optional, the default is the
last spatial layer (``filters``: the first convolution).

``GET /api/info``
    ``{"model", "input_size": [h, w], "num_classes", "labels", "device", "default_layer", "first_conv",
    "layers": [{"name", "type", "output_shape", "channels", "spatial", "conv", "params",
    "receptive_field", "receptive_field_size"}], "methods": [MethodSpec.to_json(): {"name", "family",
    "passes", "uses_layer", "summary", "paper", "view", "preview", "options": [{"name", "type", "default",
    "help", "choices", "minimum", "maximum", "range"}]}],
    "samples": [{"name", "id", "description"}], "limits": {...}}``.
``POST /api/image``
    Body: the raw bytes of an image file in any format :func:`convscope.load_image` reads (PNG, JPEG,
    WebP, GIF, TIFF, BMP ...), at most ``max_upload`` bytes (413 beyond). Answers ``{"id", "width",
    "height", "preview"}`` (``preview``: the picture the network sees). The newest 16 uploads are kept
    in memory (least recently used dropped first); the bytes are only ever decoded as an image.
``GET /api/image?image=IMAGE``
    The same answer for a stored image or a sample (the page uses it to show a chosen sample).
``GET /api/predict?image=IMAGE&top=5``
    ``{"image", "predictions": [{"rank", "index", "label", "probability"}]}`` (softmax).
``GET /api/explain?image=IMAGE&method=gradcam&layer=LAYER&target=T&view=auto&alpha=0.5&threshold=0.5&opt.KEY=VALUE``
    Runs :func:`convscope.attribute`. ``target``: class index or label (default: the top class).
    ``opt.KEY=VALUE``: method options, typed and bounded by the registry's ``parse_option`` like
    ``convscope explain --option`` (out of range: a 400 naming the option and its range). ``view``:
    ``overlay`` (map over the image), ``heatmap``, ``mask`` (only the important region kept, map >=
    ``threshold``) or ``auto`` (the method's own view, ``MethodSpec.view``, as the CLI draws it). Answers ``{"image" (PNG data URI), "width", "height", "method",
    "family", "layer", "target": {"index", "label"}, "forward_passes", "backward_passes", "passes",
    "seconds", "options", "extras"}``.
``GET /api/activations?image=IMAGE&layer=LAYER&max=64&sort=index``
    Feature-map grid of the layer (:func:`convscope.feature_maps`): ``{"image", "layer", "channels",
    "height", "width", "shown", "zero_channels"}``. ``sort``: ``index``, ``mean`` or ``max``.
``GET /api/channels?image=IMAGE&layer=LAYER&top=8``
    Mean response of every channel (:func:`convscope.channel_means`): ``{"layer", "channels",
    "zero_channels", "means": [...], "top": [{"channel", "mean"}]}``.
``GET /api/filters?layer=LAYER&max=64&scale=symmetric``
    Filter picture of a ``Conv2d`` layer (:func:`convscope.filters`; another kind of layer is a 400
    naming nearby convolutions): ``{"image", "layer", "summary", "filters", "kernel", "dead"}``.
``GET /api/visualize?objective=OBJ&steps=64&size=128&seed=0``
    Feature visualisation (:func:`convscope.visualize`) of ``LAYER:CH``, ``LAYER:CH@Y,X``, ``LAYER``,
    ``logit:CLASS`` or a weighted sum of them. ``steps`` at most 256 and ``size`` at most 224 (a 400
    says so beyond) to keep the page interactive. ``{"image", "objective", "value", "steps",
    "size", "seconds"}``.

Every call that runs the model holds one lock (hooks are not thread-safe); decoding uploads does not.
The model is left exactly as it was after every request (the library's capture engine guarantees it).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..attribution import attribute, get_method, method_names
from ..attribution.registry import VIEWS, parse_option
from ..errors import ConvscopeError
from ..images import SAMPLES, load_image
from ..inspect import channel_means, conv_layers, feature_maps, filters
from ..models import default_layer
from ..models.model import Model, as_model
from ..options import Option
from ..render import data_uri
from ..synthesis import visualize
from .jobs import JobCancelled

#: Largest upload accepted, in bytes (a 413 beyond).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest uploaded picture, in pixels (decoding a bigger one would take too much memory).
MAX_UPLOAD_PIXELS = 50_000_000
#: Largest decoded picture, in bytes: width x height x the bytes per pixel of its mode (at least 3, the
#: RGB copy the model gets), checked from the file's header *before* decoding (a 95 KB 16-bit 7000x7000
#: PNG would otherwise cost over a gigabyte). 128 MB is a 40-megapixel RGB photo.
MAX_DECODED_BYTES = 128 * 1024 * 1024
#: Uploads decoded at the same time (the others wait): bounds the memory decoding can take.
MAX_PARALLEL_DECODES = 2
#: Uploaded images kept in memory per client (browser tab), least recently used dropped first.
MAX_IMAGES = 16
#: Clients whose uploads are kept (least recently active dropped first).
MAX_CLIENTS = 32
#: Caps that keep feature visualisation interactive.
MAX_STEPS = 256
MAX_SIZE = 224
MAX_TOP = 100
MAX_GRID = 256


class ApiError(ConvscopeError):
    """An error answered with a given HTTP status (default 400)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Response:
    """What an endpoint answers: a status and a JSON-ready payload."""

    status: int
    payload: dict[str, Any]


@dataclass
class StoredImage:
    """An image as the model sees it: the preprocessed tensor (1, 3, H, W) plus its original size."""

    id: str
    width: int
    height: int
    x: torch.Tensor


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (``KeyError`` quotes stripped), never empty."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first or type(exc).__name__


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, tensors as numbers or lists, non-finite floats as None, others as str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return json_safe(value.detach().cpu().tolist())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return json_safe(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


class Query:
    """Typed access to query parameters; a bad value is a one-line 400."""

    def __init__(self, params: Mapping[str, list[str]], client: str = ""):
        self.params = params
        self.client = client

    def text(self, name: str, default: str | None = None) -> str | None:
        values = self.params.get(name)
        if not values or values[-1].strip() == "":
            return default
        return values[-1].strip()

    def required(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise ApiError(f"missing query parameter {name!r}")
        return value

    def value(self, name: str, option: Option) -> Any:
        """The parameter parsed and checked by ``option`` (its default when absent); out of range is a
        400 naming the parameter and its range."""
        raw = self.text(name)
        return option.default if raw is None else option.parse(name, raw)

    def integer(self, name: str, default: int, low: int | None = None, high: int | None = None) -> int:
        return self.value(name, Option(int, default, "", minimum=low, maximum=high))

    def number(self, name: str, default: float, low: float, high: float) -> float:
        return self.value(name, Option(float, default, "", minimum=low, maximum=high))

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default) or default
        if value not in choices:
            raise ApiError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def prefixed(self, prefix: str) -> list[tuple[str, str]]:
        """``(key, value)`` for every parameter ``PREFIXkey=value`` with a non-empty value."""
        out = []
        for name, values in self.params.items():
            if name.startswith(prefix) and values and values[-1].strip() != "":
                out.append((name[len(prefix):], values[-1].strip()))
        return out


class ImageStore:
    """Uploaded images by client (a bounded LRU of ``capacity`` per client, :data:`MAX_CLIENTS` clients)
    and bundled samples (cached, shared), by id; thread-safe. A dropped upload is remembered, so asking
    for it says so instead of "unknown"."""

    def __init__(self, capacity: int = MAX_IMAGES, max_clients: int = MAX_CLIENTS):
        self.capacity = capacity
        self.max_clients = max_clients
        self._clients: OrderedDict[str, OrderedDict[str, StoredImage]] = OrderedDict()
        self._dropped: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._samples: dict[str, StoredImage] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._clients.values())

    def _drop(self, client: str, image_id: str) -> None:
        self._dropped[(client, image_id)] = None
        while len(self._dropped) > 4096:
            self._dropped.popitem(last=False)

    def put(self, image: StoredImage, client: str = "") -> None:
        with self._lock:
            images = self._clients.setdefault(client, OrderedDict())
            self._clients.move_to_end(client)
            images[image.id] = image
            images.move_to_end(image.id)
            self._dropped.pop((client, image.id), None)
            while len(images) > self.capacity:
                self._drop(client, images.popitem(last=False)[0])
            while len(self._clients) > self.max_clients:
                gone, their = self._clients.popitem(last=False)
                for image_id in their:
                    self._drop(gone, image_id)

    def get(self, image_id: str, load_sample: Callable[[str], StoredImage], client: str = "") -> StoredImage:
        if image_id.startswith("sample:"):
            with self._lock:
                found = self._samples.get(image_id)
            if found is None:
                found = load_sample(image_id)  # raises for an unknown sample name
                with self._lock:
                    self._samples[image_id] = found
            return found
        with self._lock:
            images = self._clients.get(client)
            found = None if images is None else images.get(image_id)
            if found is None:
                if (client, image_id) in self._dropped:
                    raise ApiError(f"image {image_id!r} was dropped to make room (the server keeps the last "
                                   f"{self.capacity} uploads of each page): upload it again")
                raise ApiError(
                    f"unknown image id {image_id!r}: upload the image again (the server keeps the last {self.capacity} uploads of each page)"
                )
            images.move_to_end(image_id)
            self._clients.move_to_end(client)
            return found


class Explorer:
    """The API over one model: routes ``(HTTP method, path, query, body)`` to a :class:`Response`.

    Front-end free: :mod:`convscope.server.httpd` adds the HTTP layer. All model work runs under
    :attr:`lock`.
    """

    def __init__(self, model: Model | nn.Module, *, max_upload: int = MAX_UPLOAD_BYTES, max_images: int = MAX_IMAGES):
        self.model = as_model(model)
        self.max_upload = int(max_upload)
        self.lock = threading.Lock()
        self.decoding = threading.BoundedSemaphore(MAX_PARALLEL_DECODES)
        self.images = ImageStore(max_images)
        self._info: dict[str, Any] | None = None
        self.routes: dict[tuple[str, str], Callable[[Query, bytes], dict[str, Any]]] = {
            ("GET", "/api/info"): self.info,
            ("GET", "/api/image"): self.get_image,
            ("POST", "/api/image"): self.upload,
            ("GET", "/api/predict"): self.predict,
            ("GET", "/api/explain"): self.explain,
            ("GET", "/api/activations"): self.activations,
            ("GET", "/api/channels"): self.channels,
            ("GET", "/api/filters"): self.filters,
            ("GET", "/api/visualize"): self.visualize,
        }

    # ------------------------------------------------------------------ dispatch
    def paths(self) -> set[str]:
        return {path for _, path in self.routes}

    def handle(self, method: str, path: str, params: Mapping[str, list[str]], body: bytes = b"", client: str = "") -> Response:
        """Answer one request; never raises (errors become JSON with their status), except
        :class:`~convscope.server.jobs.JobCancelled` inside a cancelled job. ``client``: whose uploads to use."""
        fn = self.routes.get((method, path))
        if fn is None:
            if path in self.paths():
                allowed = sorted(m for m, p in self.routes if p == path)
                return Response(405, {"error": f"{path} takes {' or '.join(allowed)}, not {method}"})
            return Response(404, {"error": f"no such endpoint: {path}"})
        try:
            return Response(200, json_safe(fn(Query(params, client), body)))
        except JobCancelled:
            raise
        except ApiError as exc:
            return Response(exc.status, {"error": one_line(exc)})
        except ConvscopeError as exc:
            return Response(400, {"error": one_line(exc)})
        except Exception as exc:  # a bug: one line to the client, the traceback to the log
            traceback.print_exc()
            return Response(500, {"error": f"internal error: {type(exc).__name__}: {one_line(exc)}"})

    # ------------------------------------------------------------------ images
    def _sample(self, image_id: str) -> StoredImage:
        img = load_image(image_id)
        return StoredImage(image_id, img.width, img.height, self.model.preprocess(img))

    def image(self, query: Query) -> StoredImage:
        return self.images.get(query.required("image"), self._sample, query.client)

    def _describe_image(self, stored: StoredImage) -> dict[str, Any]:
        return {"id": stored.id, "width": stored.width, "height": stored.height,
                "preview": data_uri(self.model.deprocess(stored.x))}

    def get_image(self, query: Query, body: bytes) -> dict[str, Any]:
        return self._describe_image(self.image(query))

    def upload(self, query: Query, body: bytes) -> dict[str, Any]:
        if not body:
            raise ApiError("empty upload: send the image file's bytes as the request body")
        if len(body) > self.max_upload:
            raise ApiError(f"upload of {len(body):,} bytes is over the limit of {self.max_upload:,} bytes", 413)
        image_id = hashlib.sha256(body).hexdigest()[:16]
        check_decoded_size(body)  # before decoding: the header's size and mode
        with self.decoding:  # a few at a time: bounded memory
            img = decode_image(body)
            stored = StoredImage(image_id, img.width, img.height, self.model.preprocess(img))
            del img
        self.images.put(stored, query.client)
        return self._describe_image(stored)

    # ------------------------------------------------------------------ info
    def info(self, query: Query, body: bytes) -> dict[str, Any]:
        if self._info is None:
            with self.lock:
                self._info = self._build_info()
        return self._info

    def _build_info(self) -> dict[str, Any]:
        model = self.model
        convs = set(conv_layers(model))
        layers = []
        for r in model.layers():
            rf = r.receptive_field
            layers.append({
                "name": r.name,
                "type": r.type,
                "output_shape": list(r.output_shape) if r.output_shape is not None else None,
                "channels": r.channels,
                "spatial": r.is_spatial,
                "conv": r.name in convs,
                "params": r.params,
                "receptive_field": None if rf is None else str(rf),
                "receptive_field_size": None if rf is None or rf.size is None else list(rf.size),
            })
        methods = []
        for name in method_names():
            spec = get_method(name)
            row = spec.to_json()
            row["description"] = method_description(spec.fn.__doc__ or "", row.get("summary") or "")
            methods.append(row)
        try:
            default = default_layer(model, "cam")
        except ConvscopeError:
            default = None
        try:
            first_conv = default_layer(model, "first_conv")
        except ConvscopeError:
            first_conv = None
        return {
            "model": model.name,
            "input_size": list(model.input_size),
            "num_classes": model.num_classes,
            "labels": list(model.labels),
            "device": str(model.device),
            "default_layer": default,
            "first_conv": first_conv,
            "layers": layers,
            "methods": methods,
            "samples": [{"name": k, "id": f"sample:{k}", "description": v} for k, v in SAMPLES.items()],
            "limits": {"max_upload": self.max_upload, "max_images": self.images.capacity, "max_steps": MAX_STEPS,
                       "max_size": MAX_SIZE, "max_top": MAX_TOP, "max_grid": MAX_GRID,
                       "max_decoded_bytes": MAX_DECODED_BYTES},
        }

    def _layer(self, query: Query, kind: str = "cam") -> str:
        layer = query.text("layer")
        if layer is not None:
            return layer
        return default_layer(self.model, kind)

    # ------------------------------------------------------------------ model endpoints
    def predict(self, query: Query, body: bytes) -> dict[str, Any]:
        stored = self.image(query)
        top = query.integer("top", 5, 1, MAX_TOP)
        with self.lock:
            pred = self.model.predict(stored.x, top=top)[0]
        return {"image": stored.id, "predictions": [
            {"rank": r, "index": i, "label": lab, "probability": p} for r, (i, lab, p) in enumerate(pred, start=1)
        ]}

    def explain(self, query: Query, body: bytes) -> dict[str, Any]:
        stored = self.image(query)
        spec = get_method(query.text("method", "gradcam") or "gradcam")
        layer = query.text("layer") if spec.uses_layer else None
        target_text = query.text("target")
        options = dict(parse_option(spec, f"{key}={value}") for key, value in query.prefixed("opt."))
        view = query.choice("view", "auto", ("auto", *VIEWS))
        alpha = query.number("alpha", 0.5, 0.0, 1.0)
        threshold = query.number("threshold", 0.5, 0.0, 1.0)
        with self.lock:
            target = None if target_text is None else self.model.class_index(target_text)
            start = time.perf_counter()
            a = attribute(self.model, stored.x, spec.name, target=target, layer=layer, progress=False, **options)
            seconds = time.perf_counter() - start
            view = spec.view if view == "auto" else view
            picture = spec.draw(a, view=view, alpha=alpha, threshold=threshold)
        t = int(a.target[0])
        extras = {}
        if "completeness_error" in a.extras:
            err = float(a.extras["completeness_error"][0])
            extras["completeness_error"] = err
            advice = completeness_advice(err, a.options)
            if advice:
                extras["advice"] = advice
        if "engine" in a.extras:
            extras["engine"] = a.extras["engine"]
        return {
            "image": data_uri(picture),
            "width": picture.width,
            "height": picture.height,
            "view": view,
            "method": a.method,
            "family": spec.family,
            "layer": a.layer,
            "target": {"index": t, "label": self.model.label(t)},
            "forward_passes": a.forward_passes,
            "backward_passes": a.backward_passes,
            "passes": spec.passes,
            "seconds": seconds,
            "options": {k: v for k, v in a.options.items() if not isinstance(v, torch.Tensor)},
            "extras": extras,
        }

    def activations(self, query: Query, body: bytes) -> dict[str, Any]:
        stored = self.image(query)
        top = query.integer("max", 64, 1, MAX_GRID)
        sort = query.choice("sort", "index", ("index", "mean", "max"))
        with self.lock:
            layer = self._layer(query)
            fm = feature_maps(self.model, stored.x, layer, max_channels=top, sort=sort)
            picture = fm.image
        c, h, w = fm.shape
        zero = int((fm.activations.flatten(1) == 0).all(1).sum())
        return {"image": data_uri(picture), "layer": layer, "channels": c, "height": h, "width": w,
                "shown": min(c, top), "sort": sort, "zero_channels": zero}

    def channels(self, query: Query, body: bytes) -> dict[str, Any]:
        stored = self.image(query)
        top = query.integer("top", 8, 1, MAX_GRID)
        with self.lock:
            layer = self._layer(query)
            resp = channel_means(self.model, stored.x, layer)
        return {"image": stored.id, "layer": layer, "channels": int(resp.means.shape[1]),
                "zero_channels": int(resp.zero[0]), "means": [float(v) for v in resp.values.tolist()],
                "top": [{"channel": c, "mean": v} for c, v in resp.top(top)]}

    def filters(self, query: Query, body: bytes) -> dict[str, Any]:
        top = query.integer("max", 64, 1, MAX_GRID)
        scale = query.choice("scale", "symmetric", ("symmetric", "minmax"))
        with self.lock:
            layer = self._layer(query, "first_conv")
            fs = filters(self.model, layer, max_filters=top, scale=scale)
            picture = fs.image
        return {"image": data_uri(picture), "layer": fs.layer, "summary": str(fs), "filters": fs.out_channels,
                "kernel": list(fs.kernel_size), "kind": fs.kind, "dead": list(fs.dead)}

    def visualize(self, query: Query, body: bytes) -> dict[str, Any]:
        objective = query.required("objective")
        steps = query.integer("steps", 64, 1, MAX_STEPS)  # capped to keep the page interactive
        size = query.integer("size", 128, 16, MAX_SIZE)
        seed = query.integer("seed", 0, 0, 2**31 - 1)
        with self.lock:
            start = time.perf_counter()
            try:
                r = visualize(self.model, objective, steps=steps, size=size, seed=seed, progress=False)
            except ConvscopeError as exc:
                raise ApiError(one_line(exc) + quoting_hint(objective)) from None
            seconds = time.perf_counter() - start
            picture = r.image
        return {"image": data_uri(picture), "objective": objective, "value": float(r.objective),
                "steps": steps, "size": size, "seed": seed, "seconds": seconds}


def decode_image(data: bytes):
    """Uploaded bytes -> validated RGB PIL image, through :func:`convscope.load_image` (never unpickled):
    the same checks as for files on disk (decompression bombs, truncation, EXIF orientation, odd modes),
    in memory; error messages say ``upload``."""
    try:
        return load_image(data, max_pixels=MAX_UPLOAD_PIXELS)
    except ConvscopeError as exc:
        message = one_line(exc).replace("uploaded image: ", "", 1)
        raise ApiError(f"upload: {message}") from None


#: Bytes per pixel of PIL modes (others: 4).
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
              "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "BGR;16": 2, "BGR;15": 2, "BGR;24": 3}


def check_decoded_size(data: bytes, limit: int | None = None) -> None:
    """Refuse, before decoding, a picture whose decoded size (width x height x bytes per pixel of its
    mode, at least 3 for the RGB copy) is over ``limit`` (default :data:`MAX_DECODED_BYTES`). Reads the
    header only; a file PIL cannot even open is left to :func:`decode_image` to explain."""
    limit = MAX_DECODED_BYTES if limit is None else limit
    try:
        with Image.open(io.BytesIO(data)) as img:
            (w, h), mode = img.size, img.mode
    except Exception:  # unreadable: decode_image gives the one-line reason
        return
    need = w * h * max(3, MODE_BYTES.get(mode, 4))
    if need > limit:
        raise ApiError(f"upload: a {w}x{h} {mode} picture takes {need / 2**20:,.0f} MB decoded, over the limit of "
                       f"{limit / 2**20:,.0f} MB; scale it down first", 413)


def method_description(doc: str, summary: str) -> str:
    """The first paragraph of a method's docstring as plain text (``literal`` marks dropped, lines joined),
    so the page shows whole sentences rather than the registry's first line."""
    para = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        para.append(line.strip())
    text = " ".join(para) or summary
    text = re.sub(r":(?:func|class|meth|data|attr|mod):`~?([^`]+)`", r"\1", text)
    return text.replace("``", "").replace("`", "")


def completeness_advice(error: float, options: Mapping[str, Any]) -> str:
    """What to do about an integrated-gradients completeness error over 5%: more points on the path."""
    if not math.isfinite(error) or abs(error) <= 0.05:
        return ""
    steps = options.get("steps")
    if isinstance(steps, int):
        more = (f"raise steps (try {min(4096, steps * 4)}) or leave steps empty for the adaptive mode, "
                "which doubles them until the error is under its tolerance")
    else:
        cap = options.get("max_steps")
        more = f"raise max_steps (now {cap}; up to 4096)" if isinstance(cap, int) else "raise max_steps"
    return (f"completeness error {100 * abs(error):.0f}%: the attributions add up to the score change only "
            f"that closely; {more}. Under 5% the map is a faithful integral.")


def quoting_hint(objective: str) -> str:
    """A hint appended to an objective error when a ``logit:`` class name holds a space without quotes."""
    m = re.search(r"logit:([^\"'+\-][^+\-]*\s[^+\-]*)", objective)
    if m and not re.search(r"logit:[\"']", objective):
        name = m.group(1).strip()
        return f"; class names with spaces need quotes: logit:\"{name}\""
    return ""
