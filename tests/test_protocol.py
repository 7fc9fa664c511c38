"""The measurement protocol (lightflax/timing.py, its last section): exact values on hand-made inputs."""

import pytest

from lightflax import timing as protocol  # the protocol lives in timing.py


def test_round_ratios_are_per_round():
    assert protocol.round_ratios([2.0, 3.0, 1.0], [4.0, 2.0, 1.0]) == [0.5, 1.5, 1.0]


@pytest.mark.parametrize("a,b", [([1.0], [1.0, 2.0]), ([], []), ([1.0, 0.0], [1.0, 1.0]), ([1.0], [-1.0])])
def test_round_ratios_refuse_bad_input(a, b):
    with pytest.raises(ValueError):
        protocol.round_ratios(a, b)


def test_pool_takes_every_round_of_every_run():
    # 11 values 0.0 .. 1.0 split over three runs: median 0.5, p10 0.1, p90 0.9 (linear interpolation)
    runs = [[0.0, 0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0]]
    got = protocol.pool(runs)
    assert got["n_runs"] == 3 and got["n_rounds"] == 11
    assert got["median"] == pytest.approx(0.5, abs=1e-12)
    assert got["p10"] == pytest.approx(0.1, abs=1e-12)
    assert got["p90"] == pytest.approx(0.9, abs=1e-12)


def test_pool_interpolates_between_rounds():
    got = protocol.pool([[1.0, 2.0], [3.0, 4.0]])  # p10 = 1 + 0.3 * 1, p90 = 3 + 0.7 * 1
    assert (got["median"], got["p10"], got["p90"]) == pytest.approx((2.5, 1.3, 3.7), abs=1e-12)


def test_pool_refuses_nothing():
    with pytest.raises(ValueError):
        protocol.pool([[], []])


@pytest.mark.parametrize("p10,p90,word", [(0.7, 0.99, "faster"), (0.7, 1.0, "at par"), (0.9, 1.1, "at par"),
                                          (1.0, 1.3, "at par"), (1.01, 1.3, "slower")])
def test_verdict(p10, p90, word):
    assert protocol.verdict(p10, p90) == word


def test_round_value_is_the_median_step():
    assert protocol.round_value([0.3, 0.1, 0.2]) == 0.2
    assert protocol.round_value([0.1, 0.4]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        protocol.round_value([])


STAT = """cpu  100 10 50 800 20 5 5 10 7 0
cpu0 50 5 25 400 10 2 3 5 3 0
intr 1234
"""
STAT_LATER = """cpu  160 10 70 880 20 5 5 50 9 0
cpu0 80 5 35 440 10 2 3 25 4 0
"""


def test_parse_cpu_times_reads_the_aggregate_line():
    assert protocol.parse_cpu_times(STAT) == {"user": 100, "nice": 10, "system": 50, "idle": 800, "iowait": 20,
                                              "irq": 5, "softirq": 5, "steal": 10}
    assert protocol.parse_cpu_times("cpu 1 2 3 4\n")["steal"] == 0  # old kernels: fewer fields
    with pytest.raises(ValueError):
        protocol.parse_cpu_times("cpu0 1 2 3\n")


def test_cpu_fractions_steal_and_busy():
    # deltas: user 60, system 20, idle 80, steal 40 -> total 200; steal 0.2, busy (200 - 80) / 200 = 0.6
    got = protocol.cpu_fractions(protocol.parse_cpu_times(STAT), protocol.parse_cpu_times(STAT_LATER))
    assert got == {"steal": pytest.approx(0.2), "busy": pytest.approx(0.6)}
    same = protocol.parse_cpu_times(STAT)
    assert protocol.cpu_fractions(same, same) == {"steal": None, "busy": None}


def test_cpu_model_and_thread_env():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
    assert protocol.cpu_model(text) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert protocol.cpu_model("processor : 0\n") is None
    env = {"OMP_NUM_THREADS": "1", "HOME": "/root", "XLA_FLAGS": "--x", "LIGHTFLAX_NATIVE_THREADS": "2",
           "PATH": "/bin", "XLA_OTHER": "y"}
    assert protocol.thread_env(env) == {"LIGHTFLAX_NATIVE_THREADS": "2", "OMP_NUM_THREADS": "1", "XLA_FLAGS": "--x"}


def test_machine_state_records_the_machine():
    state = protocol.machine_state(interval_s=0.05)
    assert len(state["loadavg"]) == 3 and state["cpu_count"] >= 1
    assert state["kernels"]["kernels"] in ("native", "xla")
    assert state["steal"] is None or 0.0 <= state["steal"] <= 1.0
    assert "thread_env" in state and "cpu_model" in state
