"""inspect_queue reports the lag even when Redis cannot (group created at an arbitrary id, entries deleted)."""

from tasks.queue import inspect_queue


def test_unknown_lag_is_counted(settings, redis):
    ids = [redis.xadd(settings.stream, {"job_id": f"s{i}", "run_id": f"r{i}", "step_id": f"s{i}"}) for i in range(10)]
    redis.xgroup_create(settings.stream, settings.group, id=ids[2])  # an arbitrary id: Redis does not know the lag
    redis.xdel(settings.stream, ids[5])
    assert redis.xinfo_groups(settings.stream)[0]["lag"] is None
    snap = inspect_queue(settings=settings)
    assert snap.lag == 6  # ids[3..9] minus the deleted one are still to be delivered
    redis.xreadgroup(settings.group, "w1", {settings.stream: ">"}, count=4)
    assert inspect_queue(settings=settings).lag == 2
