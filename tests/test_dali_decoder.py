"""nvJPEG memory settings on DALI's GPU (`mixed`) decoder, as DALI's ImageNet examples set them.

The `mixed` pipelines cannot be built without a GPU, but DALI defines their graph (and checks
every operator argument against its schema) when the pipeline object is made: the tests make
the training and evaluation pipelines for `mixed` and `cpu` and record what reached
`fn.decoders.image`. Whether long runs then keep their decoder memory is for a GPU to show.
"""

from __future__ import annotations

import pytest

dali = pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, types  # noqa: E402

from pipelines import dali as dali_train  # noqa: E402
from pipelines import dali_eval  # noqa: E402
from pipelines.augment import EvalView, MultiCropRecipe  # noqa: E402
from pipelines.dali_decoder import NVJPEG_MEMORY, decoder_args  # noqa: E402

DALI_IMAGENET_EXAMPLE = {"device_memory_padding": 211025920, "host_memory_padding": 140544512,
                         "preallocate_width_hint": 5980, "preallocate_height_hint": 6430}


def test_mixed_decoder_gets_the_nvjpeg_memory_settings_and_cpu_does_not():
    mixed = decoder_args("mixed", 0.65, {"use_fast_idct": True})
    assert mixed == {"hw_decoder_load": 0.65, **DALI_IMAGENET_EXAMPLE}
    assert decoder_args("cpu", 0.65, {"use_fast_idct": True}) == {"use_fast_idct": True}
    assert decoder_args("cpu", 0.65) == {}
    with pytest.raises(ValueError, match="'mixed' or 'cpu'"):
        decoder_args("gpu", 0.65)
    mixed["device_memory_padding"] = 0  # the caller's dict is its own
    assert NVJPEG_MEMORY["device_memory_padding"] == 211025920


def test_the_paddings_are_shared_among_more_threads_than_the_examples():
    """nvJPEG pads each decoder thread: 16 threads get a quarter of the example's 4-thread sizes
    (the same totals), never less than DALI's defaults; the hardware decoder's hints stay."""
    for threads in (1, 4):
        assert decoder_args("mixed", 0.65, threads=threads) == {"hw_decoder_load": 0.65, **DALI_IMAGENET_EXAMPLE}
    wide = decoder_args("mixed", 0.65, threads=16)
    assert 16 * wide["device_memory_padding"] == pytest.approx(4 * 211025920, abs=16)
    assert 16 * wide["host_memory_padding"] == pytest.approx(4 * 140544512, abs=16)
    assert wide["preallocate_width_hint"] == 5980 and wide["preallocate_height_hint"] == 6430
    assert decoder_args("mixed", 0.65, threads=1000)["device_memory_padding"] == 16 * 2**20


@pytest.fixture
def decoder_calls(monkeypatch):
    """Every fn.decoders.image call's keyword arguments, the real operator still made (schema-checked)."""
    calls: list[dict] = []
    real = fn.decoders.image

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fn.decoders, "image", spy)
    return calls


def make_training_pipeline(device: str, threads: int = 1):
    recipe = MultiCropRecipe(global_size=32, local_size=16, num_local=1)
    return dali_train.multicrop_pipeline(iter([]), recipe, device, 0.65, types.FLOAT,
                                         batch_size=2, num_threads=threads, device_id=None)


def make_eval_pipeline(device: str, threads: int = 1):
    return dali_eval.eval_pipeline(iter([]), EvalView(32), device, 0.65, "CHW", batch_size=2, num_threads=threads,
                                   device_id=None)


@pytest.mark.parametrize("make", [make_training_pipeline, make_eval_pipeline], ids=["train", "eval"])
def test_pipelines_pass_them_to_the_mixed_decoder_only(decoder_calls, make):
    make("mixed")  # defines the graph: DALI refuses an argument its decoder does not have
    (mixed,) = decoder_calls
    assert mixed["device"] == "mixed" and mixed["hw_decoder_load"] == 0.65
    assert {k: mixed[k] for k in DALI_IMAGENET_EXAMPLE} == DALI_IMAGENET_EXAMPLE
    decoder_calls.clear()
    make("mixed", threads=8)  # the pipeline's thread count reaches the paddings
    assert decoder_calls[0]["device_memory_padding"] == 211025920 // 2
    decoder_calls.clear()
    make("cpu")
    (cpu,) = decoder_calls
    assert cpu["device"] == "cpu" and not set(DALI_IMAGENET_EXAMPLE) & set(cpu) and "hw_decoder_load" not in cpu
