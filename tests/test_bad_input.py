"""Data that is almost certainly a mistake, and bad data paths, end in one clear line, not a traceback.

- a data path whose only "classes" are split folders (the parent of train/) is refused, naming the folder;
- one class: allowed for self-supervised training (with one warning), refused for evaluation data;
- k-NN train and val folders with other classes: `error:` and exit 2 from a recipe and from tools/eval_knn.py;
- `skipped_images` counts bad files, not the lookups that passed over them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import FILE_BACKENDS, REPO, make_image_folder, requires_dali
from test_pipelines import spec_for
from fastssl.eval.errors import EvalError
from fastssl.eval.classifier import scan_splits
from pipelines import build_train_loader
from pipelines.augment import EvalView
from pipelines.eval import build_eval_loader
from pipelines.folder import DataLayoutError, scan_image_folder, scan_source

EVAL_BACKENDS = ["torchvision", pytest.param("dali", marks=requires_dali)]


def single_class_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "has one class" in str(w.message)]


# ------------------------------------------------------------------ split folders instead of class folders


@pytest.mark.parametrize("split", ["train", "val", "Validation"])
def test_the_parent_of_a_lone_split_is_refused_naming_the_split(tmp_path, split):
    make_image_folder(tmp_path / "data" / split, 2, 2)
    for scan in (scan_source, scan_image_folder):  # training and evaluation scanners
        with pytest.raises(DataLayoutError, match="only split folders") as err:
            scan(tmp_path / "data")
        assert repr(str(tmp_path / "data" / split)) in str(err.value)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_every_training_backend_refuses_a_lone_split(tmp_path, backend):
    make_image_folder(tmp_path / "data" / "train", 2, 4)
    if backend == "ffcv":  # today's converter refuses such a source; a .beton converted elsewhere
        spec = spec_for(tmp_path / "data" / "train", backend=backend)  # (or by an older converter)
        summary = Path(f"{spec.path}.json")  # records the split as its one class
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "classes": ["train"]}))
    else:
        spec = spec_for(tmp_path / "data", backend=backend)
    with pytest.raises(DataLayoutError, match="only split folders .*train/"):
        build_train_loader(spec)


# ------------------------------------------------------------------ one class


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_single_class_training_data_is_used_with_one_warning(tmp_path, backend):
    root = tmp_path / "unlabelled"
    make_image_folder(root, 1, 8)
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        loader = build_train_loader(spec_for(root, backend=backend))
    assert len(loader) == 2  # 8 images, batch 4: trained on
    [message] = single_class_warnings(first)
    assert "k-NN and linear evaluations" in message and "class_00" in message
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        build_train_loader(spec_for(root, backend=backend))
    assert single_class_warnings(second) == []  # once


def test_one_folder_holding_the_classes_is_named(tmp_path):
    make_image_folder(tmp_path / "data" / "imagenet" / "train", 2, 2)  # --data.train at /data, one level too high
    with pytest.warns(UserWarning, match="point at the folder that holds them"):
        scan_source(tmp_path / "data")


def test_single_label_file_list_warns(tmp_path):
    make_image_folder(tmp_path / "imgs", 1, 3)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"imgs/class_00/img_{j:03d}.JPEG 0\n" for j in range(3)))
    with pytest.warns(UserWarning, match="has one label"):
        samples, _ = scan_source(lst)
    assert len(samples) == 3


def test_a_link_back_up_the_tree_lists_each_image_once(tmp_path):
    """`class_00/up -> ..` listed the whole tree again under class_00 (984 images from 24), as class_00's."""
    make_image_folder(tmp_path / "train", 2, 3)
    (tmp_path / "train" / "class_00" / "up").symlink_to("..")
    samples, classes = scan_source(tmp_path / "train")
    assert classes == ["class_00", "class_01"] and len(samples) == 6
    assert sorted(label for _, label in samples) == [0, 0, 0, 1, 1, 1]


def test_a_file_list_label_past_any_class_count_is_named_before_the_classes_are_listed(tmp_path):
    """The classes of a file list are 0..its largest label: 999999999999 listed that many names until the
    kernel killed the run (24 GB)."""
    make_image_folder(tmp_path / "imgs", 1, 2)
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/class_00/img_000.JPEG 0\nimgs/class_00/img_001.JPEG 999999999999\n")
    with pytest.raises(DataLayoutError, match=r"list.txt:2: label 999999999999 .*at most 999999\)"):
        scan_source(lst)


def test_a_binary_file_given_as_a_file_list_or_subset_is_named_not_a_decode_error(tmp_path):
    from fastssl.eval.errors import EvalError
    from fastssl.eval.subsets import read_subset_lines

    binary = tmp_path / "backbone.txt"
    binary.write_bytes(b"\x80\x02weights" * 4)  # e.g. a .pth named by mistake
    with pytest.raises(DataLayoutError, match=r"file list '.*backbone.txt' is not a text file \(invalid start byte"):
        scan_source(binary)
    with pytest.raises(EvalError, match=r"subset file '.*backbone.txt' is not a text file"):
        read_subset_lines(binary)


@pytest.mark.parametrize("backend", EVAL_BACKENDS)
def test_single_class_evaluation_data_is_refused(tmp_path, backend):
    make_image_folder(tmp_path / "val", 1, 4)
    with pytest.raises(DataLayoutError, match="at least 2 class folders"):
        build_eval_loader(backend, str(tmp_path / "val"), EvalView(16), 4)


def test_single_class_linear_eval_data_is_refused(tmp_path):
    make_image_folder(tmp_path / "train", 1, 4)
    make_image_folder(tmp_path / "val", 1, 2)
    with pytest.raises(EvalError, match="at least 2 class folders"):
        scan_splits(str(tmp_path / "train"), str(tmp_path / "val"))


# ------------------------------------------------------------------ the command lines: error, exit 2, no traceback


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_clean_error(out: subprocess.CompletedProcess, needle: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "error: " in out.stderr and needle in out.stderr, out.stderr


@pytest.mark.parametrize("case, needle", [
    ("mismatch", "the k-NN needs the same class folders"),
    ("one_class", "at least 2 class folders"),
])
def test_recipe_with_unusable_knn_data_exits_2_before_any_output(tmp_path, case, needle):
    make_image_folder(tmp_path / "train", 1 if case == "one_class" else 3, 4, size=24)
    make_image_folder(tmp_path / "val", 2, 2, size=24)
    out = run(str(REPO / "recipes" / "mira_demo.py"), "--data.train", str(tmp_path / "train"),
              "--data.val", str(tmp_path / "val"), "--train.run_dir", str(tmp_path / "run"),
              "--train.global_batch_size", "4", "--data.num_workers", "0")
    assert_clean_error(out, needle)
    assert not (tmp_path / "run").exists()


def test_training_data_that_is_all_unreadable_exits_2_in_one_line(tmp_path):
    """16 bad files in a row: the data is broken, a user error (it was a RuntimeError with a traceback; from a
    DataLoader worker, torch also puts the worker's traceback in front of the message)."""
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(10):
            (tmp_path / "train" / c / f"x{i}.JPEG").write_bytes(bytes(range(256)) * 2)
    out = run(str(REPO / "recipes" / "mira_demo.py"), "--data.train", str(tmp_path / "train"), "--data.val=",
              "--train.run_dir", str(tmp_path / "run"), "--train.global_batch_size", "4", "--data.num_workers", "2")
    assert_clean_error(out, "16 unreadable images in a row, from ")
    assert "the data, not one file, is broken" in out.stderr and "DataLoader worker" not in out.stderr


def test_a_knn_whose_val_images_are_all_unreadable_keeps_the_epoch_and_exits_2(tmp_path):
    """The k-NN after an epoch ran before its checkpoint, and an unreadable val folder ended the run there with
    'no queries to evaluate' (exit 1): the epoch's training was lost. It is saved first now."""
    make_image_folder(tmp_path / "train", 2, 4, size=24)
    for c in ("class_00", "class_01"):  # the train folder's classes
        (tmp_path / "val" / c).mkdir(parents=True)
        (tmp_path / "val" / c / "x.JPEG").write_bytes(b"not a jpeg")
    out = run(str(REPO / "recipes" / "mira_demo.py"), "--data.train", str(tmp_path / "train"), "--data.val",
              str(tmp_path / "val"), "--train.run_dir", str(tmp_path / "run"), "--train.global_batch_size", "4",
              "--data.num_workers", "0", "--train.epochs", "1", "--eval.knn_at_start", "false",
              "--eval.knn_every", "1")
    assert_clean_error(out, "the k-NN's queries (val) has no readable image")
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert (tmp_path / "run" / "epochs.csv").read_text().count("\n") == 2  # the header and the epoch's row
    # The last epoch's: a --resume would find the run finished and exit 0 without any k-NN; the advice is the tool.
    assert "every epoch (1) is trained and saved, so a resume has nothing left to do" in out.stderr
    measure = out.stderr.split("measure the k-NN with: ", 1)[1].split(" (--val DIR")[0]
    assert measure == f"python tools/eval_knn.py {tmp_path / 'run'}", out.stderr


def test_recipe_with_a_queue_longer_than_the_data_exits_2_before_any_output(tmp_path):
    """The data's size is known only once the loader is built: the error is still one line, exit 2."""
    make_image_folder(tmp_path / "train", 2, 6, size=24)
    out = run(str(REPO / "recipes" / "mira_demo.py"), "--data.train", str(tmp_path / "train"), "--data.val=",
              "--method.objective", "mira+mlcpc", "--critic.queue_size", "12", "--train.global_batch_size", "4",
              "--train.run_dir", str(tmp_path / "run"), "--data.num_workers", "0")
    assert_clean_error(out, "critic.queue_size: 12 is not smaller than the dataset (12 images)")
    assert not (tmp_path / "run").exists()


def test_recipe_with_an_uninstalled_loader_exits_2_naming_the_fix(tmp_path):
    """`--data.backend dali` (or `--eval.loader dali`) where DALI does not import: one line that says
    how to install it and which option avoids it (the recipe runs with DALI's import made to fail)."""
    make_image_folder(tmp_path / "train", 2, 6, size=24)
    common = ["--data.train", str(tmp_path / "train"), "--train.run_dir", str(tmp_path / "run"),
              "--train.global_batch_size", "4", "--data.num_workers", "0"]
    without_dali = ("import runpy, sys; sys.modules['nvidia.dali'] = None; sys.argv = sys.argv[1:]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")
    for flags, needle in [(["--data.backend", "dali", "--data.val="], "or pick --data.backend torchvision"),
                          (["--eval.loader", "dali", "--data.val", str(tmp_path / "train")],
                           "in a recipe, --eval.loader torchvision")]:
        out = run("-c", without_dali, str(REPO / "recipes" / "mira_demo.py"), *common, *flags)
        assert_clean_error(out, "is not available (")
        assert "install it with `rm -f .venv/.fastssl-installed && make setup`" in out.stderr and needle in out.stderr, out.stderr
        assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """An exported backbone (weights do not matter: every case fails before the first forward)."""
    from fastssl.models.backbone import build_backbone

    path = tmp_path_factory.mktemp("bb") / "backbone_resnet18.pth"
    torch.save(build_backbone("resnet18").state_dict(), path)
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("flat", "no class folders"),
    ("mismatch", "the k-NN needs the same class folders"),
    ("one_class", "at least 2 class folders"),
])
def test_eval_knn_reports_bad_data_in_one_line(tmp_path, backbone, case, needle):
    train, val = tmp_path / "train", tmp_path / "val"
    make_image_folder(train, 1 if case == "one_class" else 3, 2, size=24)
    if case == "flat":
        val.mkdir()
        (train / "class_00" / "img_000.JPEG").rename(val / "loose.JPEG")
    elif case != "missing":
        make_image_folder(val, 1 if case == "one_class" else 2, 2, size=24)
    out = run(str(REPO / "tools" / "eval_knn.py"), str(backbone), "--train", str(train), "--val", str(val),
              "--image-size", "16", "--device", "cpu", "--json", str(tmp_path / "k.json"))
    assert_clean_error(out, needle)
    assert not (tmp_path / "k.json").exists()


# ------------------------------------------------------------------ skipped_images counts bad files


@pytest.mark.parametrize("batch_size", [1, 11])
@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=requires_dali)])
def test_three_corrupt_jpegs_count_three_skips_per_epoch(tmp_path, backend, batch_size):
    root = tmp_path / "train"
    make_image_folder(root, 2, 4, size=24)
    good = (root / "class_00" / "img_000.JPEG").read_bytes()
    for j in range(3):  # consecutive in the sorted order: a lookup passes over several of them
        (root / "class_00" / f"bad_{j}.JPEG").write_bytes(good[: len(good) // 3])
    loader = build_train_loader(spec_for(root, backend=backend, batch_size=batch_size))
    for epoch in range(2):  # each epoch counts the bad files it met; DALI remembers them but still counts
        loader.set_epoch(epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(loader)
        assert sum(len(b.index) for b in batches) == 11
        assert sum(b.num_skipped for b in batches) == 3


@pytest.mark.timeout(120)  # without the check, the open of a named pipe waits for a writer for ever
@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=requires_dali)])
def test_a_named_pipe_named_like_an_image_is_skipped_as_what_it_is_not_waited_on(tmp_path, backend):
    import os

    from pipelines.images import decode_for_conversion

    root = tmp_path / "train"
    make_image_folder(root, 2, 4, size=24)
    fifo = root / "class_01" / "img_fifo.JPEG"
    os.mkfifo(fifo)
    loader = build_train_loader(spec_for(root, backend=backend, batch_size=3))
    with pytest.warns(UserWarning, match=r"img_fifo\.JPEG.*a named pipe \(FIFO\), not a regular file: remove it"):
        batches = list(loader)
    assert sum(len(b.index) for b in batches) == 9 and sum(b.num_skipped for b in batches) == 1  # replaced
    assert decode_for_conversion(str(fifo)) == (None, "unreadable: a named pipe (FIFO), not a regular file: "
                                                      "remove it from the data folder")


# ------------------------------------------------------------------ a decoder that dies on a bad file


def test_a_decoder_that_fails_a_pass_gets_the_bad_file_retired_and_restarts_after_the_last_batch(tmp_path, monkeypatch):
    """`pipelines.images.run_retiring_bad_files`, which both DALI loaders run, with a stand-in decoder that
    prefetches one batch ahead and fails the pass on a file that only a full decode can refuse."""
    from types import SimpleNamespace

    from pipelines.images import run_retiring_bad_files

    paths = make_image_folder(tmp_path / "d", 1, 6, size=24)
    good = paths[2].read_bytes()
    paths[2].write_bytes(good[:4] + bytes(200) + good[204:])  # starts and ends like a JPEG
    samples = [(str(p), 0) for p in paths]
    batches, bad, done, passes = [[0, 1], [2, 3], [4, 5]], {}, 0, []

    def new_feeder():
        if done >= len(batches):
            return None
        passes.append(done)
        return SimpleNamespace(sent=[], batches=[[i for i in b if i not in bad] for b in batches[done:]])

    def decode(feeder):
        feeder.sent.append(feeder.batches[0])
        for k, b in enumerate(feeder.batches):
            if k + 1 < len(feeder.batches):
                feeder.sent.append(feeder.batches[k + 1])  # prefetched: in flight when batch k fails
            if 2 in b:
                raise RuntimeError("the pipeline is no longer valid")
            yield b

    def deliver(feeder, k, out):
        nonlocal done
        done += 1
        return out

    with pytest.warns(UserWarning, match="skipping unreadable image .*img_002"):
        got = list(run_retiring_bad_files(samples, bad, new_feeder, decode, deliver))
    assert got == [[0, 1], [3], [4, 5]]  # nothing delivered twice, nothing good lost
    assert list(bad) == [2] and passes == [0, 1]

    def broken(feeder):  # a failure that no bad file explains is not swallowed
        raise RuntimeError("out of memory")
        yield

    done, bad = 0, {}
    with pytest.raises(RuntimeError, match="out of memory"):
        list(run_retiring_bad_files(samples, bad, new_feeder, broken, deliver))
    assert bad == {}

    def out_of_memory(feeder, k, out):  # the delivery's own failure (device augmentations): no file is suspected
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    done, passes = 0, []
    with monkeypatch.context() as m:
        m.setattr("pipelines.images.retire_bad_files", lambda *a: pytest.fail("a delivery error re-decoded files"))
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            list(run_retiring_bad_files(samples, bad, new_feeder, decode, out_of_memory))
    assert bad == {} and passes == [0]


# ------------------------------------------------------------------ what the evaluation tools are pointed at


@pytest.fixture
def distill_run(tmp_path) -> Path:
    """A distillation run directory's config.json as fastssl.distill writes it (the tools read only that)."""
    from fastssl.distill.config import DistillConfig, to_dict

    run = tmp_path / "distill"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(DistillConfig())))
    return run


@pytest.mark.parametrize("tool, extra", [
    ("eval_knn", []), ("eval_linear", []), ("finetune_semi", ["--subset", "s.txt"]),
    ("eval_transfer", ["--folder", "pets=x"]), ("export_backbone", []),
])
def test_a_distillation_run_is_named_by_every_evaluation_tool(distill_run, capsys, tool, extra):
    """Not `KeyError: 'arch'`: one line saying what the directory holds and what the tools take."""
    from conftest import load_tool

    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main([str(distill_run), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "holds a distillation run (recipes/distill_mlcpc_cifar100.py" in err and "backbone_<arch>.pth" in err
    (distill_run / "config.json").write_text(json.dumps({"model": {}, "data": {}}))  # some other config
    with pytest.raises(SystemExit):
        load_tool(tool).main([str(distill_run), *extra])
    assert "has no model.arch" in capsys.readouterr().err
    (distill_run / "config.json").write_text(json.dumps({"model": {"arch": "resnet18"}}))  # was KeyError: 'data'
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main([str(distill_run), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "has no data section" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("tool, argv, says", [
    ("bench_mira", ["--sizes", "16x"], "argument --sizes: '16x' is not BxK with B, K >= 1"),
    ("bench_mira", ["--sizes", "64x3000,0x10"], "argument --sizes: '0x10' is not BxK with B, K >= 1"),
    ("bench_mira", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ("bench_optim", ["--warmup", "0"], "argument --warmup: must be >= 1, got 0"),
    ("bench_mira", ["--iters", "-1"], "argument --iters: must be >= 0, got -1"),
    ("bench_mira", ["--impls", "reference,reference,views"], "argument --impls: 'reference' is given twice"),
    ("bench_optim", ["--rounds", "0", "--tiny"], "argument --rounds: must be >= 1, got 0"),
    ("bench_optim", ["--threads", "100000000000", "--tiny"], "argument --threads: must be between 1 and 1024"),
    ("bench_bn_stats", ["--batch", "1", "--arch", "resnet18", "--global-size", "32"],
     "argument --batch: must be >= 2, got 1"),
    ("bench_loaders", ["--global-size", "0"], "argument --global-size: must be >= 8, got 0"),
    ("bench_loaders", ["--num-local", "-1"], "argument --num-local: must be >= 0, got -1"),
    ("bench_loaders", ["--backends", "torchvision,,bogus"], "argument --backends: an empty item in"),
    ("bench_loaders", ["--backends", "torchvision,bogus"], "argument --backends: unknown 'bogus'; choose from"),
    ("profile_throughput", ["--warmup-steps", "-3", "--out", "x"], "argument --warmup-steps: must be >= 0, got -3"),
    ("profile_throughput", ["--backends", "dali,", "--out", "x"], "argument --backends: an empty item in 'dali,'"),
    # Sizes no memory holds: the allocator's RuntimeError was a traceback.
    ("bench_mira", ["--sizes", "1000000000x1000000000"], "out of memory at these sizes (")
])
def test_bench_tools_refuse_unusable_sizes_at_parse_time(capsys, tool, argv, says):
    from conftest import load_tool

    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main([*argv, "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err, err


@pytest.mark.parametrize("tool, argv", [
    ("bench_loaders", ["--backends", "torchvision", "--device", "cpu", "--batches", "2", "--warmup", "1",
                       "--repeats", "1", "--batch-size", "4", "--workers", "1"]),
    ("bench_file_reads", ["--repeats", "1"])])
@pytest.mark.filterwarnings("ignore:skipping unreadable image")  # one per file, before the error
def test_bench_tools_on_a_folder_of_unreadable_images_exit_2_in_one_line(tmp_path, capsys, tool, argv):
    from conftest import load_tool

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(10):
            (tmp_path / f"c{c}" / f"x{i}.JPEG").write_bytes(b"\x00junk" * 60)
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main(["--data", str(tmp_path), *argv])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: 16 unreadable images in a row"), err[-3:]


@pytest.mark.parametrize("tool", ["bench_mira", "bench_optim", "bench_bn_stats", "bench_loaders", "bench_file_reads"])
@pytest.mark.parametrize("where, says", [("DIR", "is a directory; name a file"),
                                         ("FILE/x.json", "FILE' is a file, not a directory")])
def test_bench_tools_refuse_an_unwritable_json_before_any_work(tmp_path, capsys, tool, where, says):
    """A benchmark's minutes of work would end in a traceback at the write."""
    from conftest import load_tool

    (tmp_path / "FILE").write_text("a file where a folder should be")
    target = str(tmp_path) if where == "DIR" else str(tmp_path / where)
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main(["--json", target, "--device", "cpu"] if tool != "bench_file_reads" else
                             ["--json", target, "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: argument --json: ") and says in err, err


@pytest.mark.parametrize("tool, argv, says", [
    ("eval_linear", ["RUN", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    ("convert_imagenet_to_ffcv", [], "the following arguments are required: src, out"),
    ("eval_knn", ["RUN", "--ks", "0"], "--ks must be comma-separated positive integers, got '0'"),
    ("eval_knn", ["RUN", "--num-workers", "100000"], "argument --num-workers: must be between -1 and 512, got 100000"),
    ("convert_imagenet_to_ffcv", ["SRC", "OUT", "--num-workers", "100000"],
     "argument --num-workers: must be between 0 and 512, got 100000"),
    ("report", ["--out"], "argument --out: expected one argument"),
])
def test_a_tools_bad_argument_is_one_line_naming_where_the_options_are(capsys, tool, argv, says):
    """Not argparse's usage block (16 lines for eval_linear) before the error."""
    from conftest import load_tool

    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {says}"), err
    assert err.rstrip().endswith(f"(options: {tool}.py --help)"), err


def test_fastssl_warnings_are_one_line_and_other_libraries_keep_their_format(monkeypatch):
    import warnings

    from fastssl.cli import plain_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # put back after the test
    plain_warnings()
    plain_warnings()  # once is enough: not wrapped twice
    own = str(REPO / "pipelines" / "torchvision.py")
    assert (warnings.formatwarning("skipping unreadable image a.JPEG", UserWarning, own, 114)
            == "warning: skipping unreadable image a.JPEG\n")
    other = warnings.formatwarning("old API", DeprecationWarning, "/usr/lib/python3/x.py", 3, "")
    assert other.startswith("/usr/lib/python3/x.py:3: DeprecationWarning: old API")


def test_no_tool_reads_a_number_flag_without_bounds():
    """`type=int` / `type=float` accept nan, inf, negative and astronomically large values, which failed
    far from the command line (an overflow in torch's seeding, a NaN budget that skipped every stage, a
    traceback in PIL for a crop of 0 pixels). Every number flag goes through `fastssl.arg_types`."""
    import ast

    root = Path(__file__).resolve().parents[1]
    bare = []
    for path in sorted([*root.glob("tools/*.py"), *root.glob("fastssl/**/*.py"), *root.glob("recipes/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                for kw in node.keywords:
                    if kw.arg == "type" and isinstance(kw.value, ast.Name) and kw.value.id in ("int", "float"):
                        bare.append(f"{path.relative_to(root)}:{node.lineno} type={kw.value.id}")
    assert not bare, bare
