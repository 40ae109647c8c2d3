"""Chunk transfer of the scan: the staging order (double buffers, reuse only after release) run on CPU with
staging on, the resident caption matrix against streaming it twice, and the CUDA path against the CPU scan."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cfbd_fast import scan
from cfbd_fast.pipeline.transfer import SLOTS, ChunkFeeder, DeviceOutputs, ResidentMatrix, plan_resident
from cfbd_fast.store import EmbeddingStore

GOLDEN = Path(__file__).parent / "data" / "scan_golden"
sys.path.insert(0, str(GOLDEN))
import record  # noqa: E402  (the golden store's options and fields)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path, _ = record.make_inputs(tmp_path_factory.mktemp("transfer"))
    return path


MAPPER = str(GOLDEN / "mapper.safetensors")


def _chunks(store_path, rows, matrices=("image", "text")):
    return EmbeddingStore.open(store_path).iter_chunks(rows=rows, matrices=matrices)


@pytest.mark.parametrize("rows", [999, 1000, 6000, 7000])
def test_staged_feeder_hands_every_chunk_in_order_through_two_reused_buffers(store, rows):
    opened = EmbeddingStore.open(store)
    image, text = np.asarray(opened.matrix("image")), np.asarray(opened.matrix("text"))
    trace = []
    feeder = ChunkFeeder("cpu", staged=True, trace=trace)
    starts, pointers = [], set()
    for chunk in feeder.feed(_chunks(store, rows)):
        starts.append(chunk.start)
        time.sleep(0.001)  # a slow consumer: the chunk must still hold its rows when it is done
        np.testing.assert_array_equal(chunk.image.numpy(), image[chunk.start:chunk.stop])
        np.testing.assert_array_equal(chunk.text.numpy(), text[chunk.start:chunk.stop])
        pointers.add(chunk.text.data_ptr())
    assert starts == list(range(0, len(opened), rows))
    assert len(pointers) == min(SLOTS, len(starts))
    _check_order(trace, len(starts))


def _check_order(trace, n_chunks):
    """Chunk k + 1 is copied before chunk k is handed over (the overlap); a slot is refilled only after the chunk
    it held was released; chunks are handed over and released in order."""
    position = {(event, chunk): i for i, (event, chunk, _) in enumerate(trace)}
    slot_of = {chunk: slot for event, chunk, slot in trace if event == "fill"}
    for k in range(n_chunks):
        assert position[("fill", k)] < position[("copy", k)] < position[("yield", k)] < position[("release", k)]
        assert slot_of[k] == k % SLOTS
        if k + 1 < n_chunks:
            assert position[("copy", k + 1)] < position[("yield", k)]
            assert position[("release", k)] < position[("yield", k + 1)]
        if k >= SLOTS:
            assert position[("release", k - SLOTS)] < position[("fill", k)]


def test_unstaged_feeder_hands_the_store_views_through(store):
    opened = EmbeddingStore.open(store)
    trace = []
    for chunk in ChunkFeeder("cpu", trace=trace).feed(_chunks(store, 2500, ("text",))):
        view = np.asarray(opened.matrix("text"))[chunk.start:chunk.stop]
        np.testing.assert_array_equal(chunk.text.numpy(), view)
    assert [e for e, _, slot in trace if slot is not None] == []  # no staging buffer touched
    assert [(e, k) for e, k, _ in trace if e == "yield"] == [("yield", 0), ("yield", 1), ("yield", 2)]


@pytest.mark.parametrize("staged", [False, True])
def test_feeder_fills_a_resident_matrix(store, staged):
    opened = EmbeddingStore.open(store)
    text = np.asarray(opened.matrix("text"))
    resident = ResidentMatrix(len(opened), opened.dim, torch.float16, "cpu")
    for chunk in ChunkFeeder("cpu", staged=staged, keep={"text": resident}).feed(_chunks(store, 1024)):
        assert chunk.text.data_ptr() == resident.slice(chunk.start, chunk.stop).data_ptr()
    np.testing.assert_array_equal(resident.data.numpy(), text)
    assert [c.start for c in resident.chunks("text", 4000)] == [0, 4000]


def test_resident_plan_follows_the_share_of_free_memory():
    size = 1000 * 64 * 2
    assert plan_resident(1000, 64, 2, "cpu", 0.5, free_bytes=2 * size)
    assert not plan_resident(1000, 64, 2, "cpu", 0.4, free_bytes=2 * size)
    assert not plan_resident(1000, 64, 2, "cpu", 0.0, free_bytes=10 * size)
    assert not plan_resident(1000, 64, 2, "cpu", None, free_bytes=10 * size)  # CPU default: stream


def test_device_outputs_on_cpu_write_into_the_numpy_arrays():
    out = DeviceOutputs(5, ("z",), "cpu", columns=2)
    out["z"][1:3, 1] = torch.tensor([1.0, 2.0])
    z = out.numpy()["z"]
    assert z.shape == (5, 2) and z[1, 1] == 1.0 and z[2, 1] == 2.0 and np.isnan(z[0]).all()


@pytest.mark.parametrize("case", ["cfbd", "cfbd-paper", "cosine"])
def test_resident_staged_and_streamed_scans_agree(store, case):
    """Text kept on the device or streamed twice, chunks staged or handed through: the same outputs, bit for bit."""
    options = {**record.CASES[case], "chunk_rows": 1000}
    streamed = scan(store, MAPPER, **options, device_memory_share=0.0)
    for variant in ({"device_memory_share": 0.9}, {"stage_chunks": True},
                    {"stage_chunks": True, "device_memory_share": 0.9, "timings": True}):
        other = scan(store, MAPPER, **options, **variant)
        transfer = other.summary["transfer"]
        assert transfer["staged"] == variant.get("stage_chunks", False)
        assert transfer["text_resident"] == (case != "cosine" and "device_memory_share" in variant)
        for name in record.FIELDS:
            np.testing.assert_array_equal(getattr(other, name), getattr(streamed, name), err_msg=f"{variant} {name}")


@pytest.mark.gpu
def test_staged_cuda_feeder_keeps_a_chunk_until_released(store):
    """A consumer whose kernels lag (a device sleep before reading) still sees each chunk's own rows."""
    opened = EmbeddingStore.open(store)
    text = torch.from_numpy(np.asarray(opened.matrix("text")))
    sums = []
    for chunk in ChunkFeeder("cuda").feed(_chunks(store, 500, ("text",))):
        torch.cuda._sleep(5_000_000)
        sums.append(chunk.text.float().sum(dim=1))
    np.testing.assert_allclose(torch.cat(sums).cpu().numpy(), text.float().sum(dim=1).numpy(), rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["cfbd", "cfbd-paper", "cosine", "safeclip"])
def test_cuda_scan_matches_the_cpu_scan(store, case):
    """device="cuda" end to end (Triton kernels, staged copies, resident text, the GMM in torch): the CPU scan's
    verdicts, scores within 1e-4 (the mapper in fp32 here; the fp16 mapper has its own bound)."""
    options = record.CASES[case]
    cpu = scan(store, MAPPER, **options)
    cuda = scan(store, MAPPER, **options, device="cuda", mapper_precision="fp32")
    assert cuda.summary["transfer"] == {"staged": True, "text_resident": case not in ("cosine", "safeclip")}
    np.testing.assert_array_equal(cuda.verdict, cpu.verdict)
    for name in ("s_o", "s_g", "c", "z", "score", "posterior"):
        np.testing.assert_allclose(getattr(cuda, name), getattr(cpu, name), atol=1e-4, rtol=0, equal_nan=True,
                                   err_msg=name)


def test_cli_options_of_the_device_path(store, tmp_path):
    import json

    from typer.testing import CliRunner

    from cfbd_fast.cli.main import app

    runner = CliRunner()
    out = runner.invoke(app, ["scan", str(store), "--mapper", MAPPER, "--out", str(tmp_path / "o"), "--json",
                              "--quiet", "--timings", "--device-memory-share", "0.9", "--mapper-precision", "bf16"])
    assert out.exit_code == 0, out.output
    config = json.loads(out.output)["config"]
    assert (config["timings"], config["device_memory_share"], config["mapper_precision"]) == (True, 0.9, "bf16")
    bad = runner.invoke(app, ["scan", str(store), "--mapper", MAPPER, "--out", str(tmp_path / "p"), "--quiet",
                              "--device-memory-share", "1.5"])
    assert bad.exit_code != 0 and "device-memory-share" in bad.output
