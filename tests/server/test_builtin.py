"""The explorer on the real built-in model: the cat photo is explained as a tiger cat."""

from __future__ import annotations

import base64
import io

from PIL import Image
from serverkit import Client


def test_gradcam_on_chelsea_explains_tiger_cat(builtin_server):
    c = Client(builtin_server.url)
    pred = c.get("/api/predict?image=sample:chelsea&top=3")
    assert pred.status == 200 and pred.data["predictions"][0]["label"] == "tiger cat"
    a = c.get("/api/explain?image=sample:chelsea&method=gradcam")
    assert a.status == 200, a.data
    assert a.data["target"] == {"index": 282, "label": "tiger cat"} and a.data["layer"] == "bn2"
    img = Image.open(io.BytesIO(base64.b64decode(a.data["image"].split(",", 1)[1])))
    assert img.format == "PNG" and img.size == (224, 224)


def test_integrated_gradients_with_few_steps_gets_advice(builtin_server):
    a = Client(builtin_server.url).get("/api/explain?image=sample:chelsea&method=integrated_gradients&opt.steps=4")
    assert a.status == 200, a.data
    assert a.data["extras"]["completeness_error"] > 0.05
    assert "raise steps (try 16)" in a.data["extras"]["advice"] and "Under 5%" in a.data["extras"]["advice"]
