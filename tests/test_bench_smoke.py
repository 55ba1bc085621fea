"""The benchmark scripts import and run at toy scale (no timing is asserted)."""

from bench import loadgen
from bench.index_bench import run as run_index


def test_index_bench_runs_at_toy_scale():
    result = run_index((200,), rounds=200)
    assert result["sizes"][0]["subscriptions"] >= 200


def test_masked_frame_is_rfc6455():
    frame = loadgen.mask_frame(b"hello")
    assert frame[0] == 0x81 and frame[1] == 0x80 | 5
    key, masked = frame[2:6], frame[6:]
    assert bytes(b ^ key[i % 4] for i, b in enumerate(masked)) == b"hello"


def test_percentiles():
    values = sorted(i / 1000 for i in range(100))
    assert loadgen.percentiles(values)["p50"] == 50.0
    assert loadgen.percentiles([]) == {}
