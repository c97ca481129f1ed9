"""tools/export_backbone.py: torchvision's detection model loads the export strictly and computes
with it; the detectron2 file has detectron2's layout, names and shapes, every tensor mapped once."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import load_tool
from fastssl.models.backbone import build_backbone

RESNET50_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}
BOTTLENECK_WIDTH = {2: 64, 3: 128, 4: 256, 5: 512}


@pytest.fixture(scope="module")
def tool():
    return load_tool("export_backbone")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory as the loop leaves it: config.json + backbone_resnet50.pth (random weights,
    BatchNorm statistics made non-trivial so that a dropped buffer would show)."""
    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    torch.manual_seed(0)
    net = build_backbone("resnet50")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    torch.save(net.state_dict(), run / "backbone_resnet50.pth")
    (run / "config.json").write_text(json.dumps({"model": {"arch": "resnet50"}, "data": {"train": "", "val": ""},
                                                 "eval": {}, "aug": {"global_size": 224}}))
    return run


@pytest.fixture(scope="module")
def written(tool, run) -> dict[str, Path]:
    return tool.main([str(run)])


def test_torchvision_detection_model_loads_the_export_strictly_and_runs(written, run):
    torch.set_num_threads(1)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                 min_size=64, max_size=64).eval()
    state = torch.load(written["torchvision"], map_location="cpu", weights_only=True)
    assert not any(k.endswith("num_batches_tracked") or k.startswith("fc.") for k in state)
    model.backbone.body.load_state_dict(state, strict=True)  # every key of the body matched, none extra
    # The weights landed: the body's layer4 map is our backbone's on the same input.
    ours = build_backbone("resnet50")
    ours.load_state_dict(torch.load(run / "backbone_resnet50.pth", weights_only=True))
    ours.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = ours.layer4(ours.layer3(ours.layer2(ours.layer1(ours.maxpool(ours.relu(ours.bn1(ours.conv1(x))))))))
        got = model.backbone.body(x)["3"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        out = model([torch.rand(3, 48, 64)])  # the whole detector, on CPU
    assert set(out[0]) == {"boxes", "labels", "scores"}


def expected_detectron2_shapes() -> dict[str, tuple[int, ...]]:
    """detectron2's ResNet-50 (STRIDE_IN_1X1 False) names and shapes, written out from its layout."""
    shapes: dict[str, tuple[int, ...]] = {"stem.conv1.weight": (64, 3, 7, 7)}
    norm = ("weight", "bias", "running_mean", "running_var")
    shapes.update({f"stem.conv1.norm.{n}": (64,) for n in norm})
    in_ch = 64
    for stage, blocks in RESNET50_BLOCKS.items():
        width = BOTTLENECK_WIDTH[stage]
        for b in range(blocks):
            p = f"res{stage}.{b}"
            convs = {"conv1": (width, in_ch, 1, 1), "conv2": (width, width, 3, 3), "conv3": (4 * width, width, 1, 1)}
            if b == 0:
                convs["shortcut"] = (4 * width, in_ch, 1, 1)
            for name, shape in convs.items():
                shapes[f"{p}.{name}.weight"] = shape
                shapes.update({f"{p}.{name}.norm.{n}": (shape[0],) for n in norm})
            in_ch = 4 * width
    return shapes


def test_detectron2_file_has_detectron2_keys_and_shapes(written, run):
    with open(written["detectron2"], "rb") as f:
        ckpt = pickle.load(f)
    assert ckpt["matching_heuristics"] is True and isinstance(ckpt["__author__"], str)
    model = ckpt["model"]
    expected = expected_detectron2_shapes()
    assert set(model) == set(expected)
    assert {k: tuple(v.shape) for k, v in model.items()} == expected
    source = torch.load(run / "backbone_resnet50.pth", weights_only=True)
    tensors = [k for k in source if not k.endswith("num_batches_tracked")]
    assert len(model) == len(tensors)  # every backbone tensor mapped, once
    # The values are the backbone's: spot-check the stem, a shortcut and a deep BatchNorm.
    torch.testing.assert_close(torch.from_numpy(model["stem.conv1.norm.running_var"]), source["bn1.running_var"])
    torch.testing.assert_close(torch.from_numpy(model["res3.0.shortcut.weight"]),
                               source["layer2.0.downsample.0.weight"])
    torch.testing.assert_close(torch.from_numpy(model["res5.2.conv3.norm.bias"]), source["layer4.2.bn3.bias"])


def test_out_dir_is_made_and_the_detectron2_note_fits_the_architecture(tool, tmp_path, capsys):
    """`--out-dir exports/` as the README writes it, not yet there; ResNet-18 needs detectron2's depth and
    64-channel res2 keys besides the common ones."""
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "backbone_resnet18.pth")
    written = tool.main([str(tmp_path / "backbone_resnet18.pth"), "--format", "detectron2",
                         "--out-dir", str(tmp_path / "exports" / "r18")])
    assert written["detectron2"].parent == tmp_path / "exports" / "r18" and written["detectron2"].is_file()
    note = capsys.readouterr().out
    assert "MODEL.RESNETS.DEPTH 18, MODEL.RESNETS.RES2_OUT_CHANNELS 64" in note and "STRIDE_IN_1X1 False" in note
    assert "replacing" not in note
    # Another backbone of the same name into the same folder (two runs' exports side by side) replaces the first:
    # said, not silent.
    tool.main([str(tmp_path / "backbone_resnet18.pth"), "--format", "detectron2",
               "--out-dir", str(tmp_path / "exports" / "r18")])
    assert "(replacing the file there; pass --out-dir elsewhere to keep both)" in capsys.readouterr().out


def test_bad_input_exits_2(tool, tmp_path, capsys):
    net = build_backbone("resnet18", "cifar")
    torch.save(net.state_dict(), tmp_path / "backbone_resnet18.pth")
    for argv, says in (([str(tmp_path / "nothing.pth")], "does not exist"),
                       ([str(tmp_path / "backbone_resnet18.pth")], "CIFAR stem"),
                       ([str(tmp_path / "backbone_resnet18.pth"), "--format", "onnx"],
                        "argument --format: unknown 'onnx'; choose from torchvision, detectron2")):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone_resnet18.pth"]  # nothing half-written


def test_a_run_without_its_backbone_yet_is_said_to_be_one(tool, run, tmp_path, capsys):
    young = tmp_path / "young_run"
    young.mkdir()
    (young / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(young)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "has no exported backbone yet (backbone_resnet50.pth)" in err, err


def test_an_export_that_cannot_be_written_exits_2_in_one_line(tool, tmp_path, capsys):
    """A folder where the file goes (or a full disk): one line naming the file (it was an OSError traceback)."""
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "backbone_resnet18.pth")
    (tmp_path / "backbone_resnet18_tv_detection.pth").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(tmp_path / "backbone_resnet18.pth"), "--format", "torchvision"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "backbone_resnet18_tv_detection.pth' could not be written" in err and "--out-dir" in err


def test_a_full_disk_in_torch_save_exits_2_in_one_line_and_keeps_the_old_export(tool, tmp_path, capsys, monkeypatch):
    """torch.save's writer reports a full disk as a RuntimeError ("unexpected pos ..."), not an OSError:
    it was a traceback. The file it would have replaced stays whole."""
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "backbone_resnet18.pth")
    old = tmp_path / "backbone_resnet18_tv_detection.pth"
    old.write_bytes(b"the earlier export")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6440640 vs 6440528")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(tmp_path / "backbone_resnet18.pth"), "--format", "torchvision"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "could not be written (the write stopped short: is the disk full?); free space there" in err
    assert old.read_bytes() == b"the earlier export" and not list(tmp_path.glob("*.tmp"))


def test_the_evaluation_tools_take_the_torchvision_export_and_name_the_detectron2_one(written, run):
    """The torchvision detection export is the backbone without BatchNorm's step counters: the
    evaluations load it as the backbone itself; the detectron2 file is named for what it is."""
    from fastssl.eval.backbone_io import load_backbone
    from fastssl.eval.errors import EvalError

    net, arch = load_backbone(written["torchvision"], None)
    own, _ = load_backbone(run / "backbone_resnet50.pth", None)
    assert arch == "resnet50"
    theirs, ours = net.state_dict(), own.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours if not k.endswith("num_batches_tracked"))
    with pytest.raises(EvalError, match="is a detectron2 export .* evaluate the backbone_<arch>.pth"):
        load_backbone(written["detectron2"], None)


def test_a_whole_torchvision_classifier_is_read_without_its_fc_layer(tmp_path, capsys):
    """torchvision's own resnet18 state_dict (a supervised baseline) carries fc.*: its backbone is read, with a
    note, not refused as "another architecture"; the wrong --arch still is."""
    from fastssl.eval.backbone_io import load_backbone
    from fastssl.eval.errors import EvalError

    torch.manual_seed(3)
    whole = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(whole, tmp_path / "resnet18_supervised.pth")
    net, arch = load_backbone(tmp_path / "resnet18_supervised.pth", None)
    assert arch == "resnet18" and "its fc.weight, fc.bias are not read" in capsys.readouterr().err
    loaded = net.state_dict()
    assert set(loaded) == set(whole) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(loaded[k], whole[k]) for k in loaded)
    with pytest.raises(EvalError, match="it is a resnet18's: pass --arch resnet18"):
        load_backbone(tmp_path / "resnet18_supervised.pth", "resnet50")
