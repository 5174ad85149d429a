"""The time-averaged in-flight count the gateway reports for autoscaling, on an injected clock."""

from serve_app.load_meter import LoadMeter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_average_weighs_each_count_by_how_long_it_lasted():
    clock = Clock()
    meter = LoadMeter(clock)
    meter.add(+2)
    clock.now += 1  # 2 in flight for 1 s
    meter.add(-2)
    clock.now += 3  # none for 3 s
    assert meter.average() == 0.5  # (2 * 1 + 0 * 3) / 4


def test_each_report_covers_only_the_time_since_the_previous_one():
    clock = Clock()
    meter = LoadMeter(clock)
    meter.add(+4)
    clock.now += 2
    assert meter.average() == 4.0
    meter.add(-3)
    clock.now += 2
    assert meter.average() == 1.0, "the 4 in flight before the last report no longer count"


def test_a_report_at_the_same_instant_gives_the_count_now():
    clock = Clock()
    meter = LoadMeter(clock)
    with meter.counting():
        assert meter.active == 1
        assert meter.average() == 1.0
    assert meter.active == 0


def test_counting_releases_the_request_when_the_block_raises():
    meter = LoadMeter(Clock())
    try:
        with meter.counting():
            raise RuntimeError("a failed request")
    except RuntimeError:
        pass
    assert meter.active == 0
