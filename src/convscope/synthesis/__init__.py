"""Synthesis: images made by optimisation against a network.

Feature visualisation (:func:`visualize`, :func:`render_channels`, :func:`multiscale`), DeepDream
(:func:`dream`), feature inversion (:func:`invert`, :func:`invert_layers`, :func:`perturbation_study`),
texture and style (:func:`texture`, :func:`style_transfer`) and adversarial / fooling images
(:func:`adversarial`, :func:`fooling_image`), fast feed-forward style (:func:`train_fast_style`,
:func:`stylize`). Pieces are replaceable: objectives, parameterisations,
transforms and regularisers live in their own modules. Every result is a :class:`SynthesisResult`
(shown as a picture in Jupyter). Every entry point takes a :class:`~convscope.Model` or a plain
``nn.Module`` (converted once by :func:`~convscope.models.as_model`).
"""

from __future__ import annotations

from . import objectives, params, regularizers, transforms
from .adversarial import AdversarialResult, adversarial, fooling_image
from .dream import Dream, dream
from .fast_style import FastStyleResult, TransformNet, load_transform_net, stylize, train_fast_style
from .inversion import Inversion, PerturbationStudy, invert, invert_layers, perturbation_study
from .network import NotDifferentiableError
from .objectives import (
    Objective,
    ObjectiveSyntaxError,
    channel,
    direction,
    diversity,
    layer,
    logit,
    neuron,
    parse_objective,
)
from .render import Rendering, evaluate, multiscale, render, render_channels, visualize
from .result import SynthesisResult
from .style import StyleResult, gram, style_transfer, texture

__all__ = [
    "AdversarialResult",
    "FastStyleResult",
    "TransformNet",
    "load_transform_net",
    "stylize",
    "train_fast_style",
    "Dream",
    "Inversion",
    "PerturbationStudy",
    "StyleResult",
    "SynthesisResult",
    "adversarial",
    "gram",
    "style_transfer",
    "texture",
    "dream",
    "fooling_image",
    "invert",
    "invert_layers",
    "perturbation_study",
    "NotDifferentiableError",
    "Objective",
    "ObjectiveSyntaxError",
    "Rendering",
    "channel",
    "direction",
    "diversity",
    "evaluate",
    "layer",
    "logit",
    "multiscale",
    "neuron",
    "objectives",
    "params",
    "parse_objective",
    "regularizers",
    "render",
    "render_channels",
    "transforms",
    "visualize",
]
