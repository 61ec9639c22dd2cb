"""The small pieces behind training on a cluster: the restart bound, where workers ran and what crossed their links,
and the settings that choose them."""
from __future__ import annotations

import pytest

from eimf.config import ConfigError, load_config
from eimf.training.host_stats import WorkerPlacement, link_bytes, placement_metrics, placement_tags
from eimf.training.runner import check_cpu_reservation, restart_attempts


def test_restart_attempts_spend_about_the_timeout(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert [restart_attempts(t) for t in (1, 60, 61, 120, 600)] == [0, 0, 1, 1, 9]
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    assert restart_attempts(600) == 19


def test_placement_tags_and_per_step_bytes():
    workers = [WorkerPlacement(0, "eimf-w2", "10.0.0.12", 2_000, 4_000, 100),
               WorkerPlacement(1, "eimf-w1", "10.0.0.11", 1_000, 1_000, 0)]
    tags = placement_tags(workers)
    assert tags["worker.0.host"] == "eimf-w2 (10.0.0.12)" and tags["worker.1.host"] == "eimf-w1 (10.0.0.11)"
    assert tags["worker.0.link"] == "rx 20 B/step, tx 40 B/step"
    assert tags["worker.1.link"] == "rx 1000 B/step, tx 1000 B/step"  # no step taken: per one step, not a 0 division
    m = placement_metrics(workers)
    assert m == {"hosts": 2.0, "net/rx_bytes_per_step_mean": 510.0, "net/rx_bytes_per_step_max": 1000.0,
                 "net/tx_bytes_per_step_mean": 520.0, "net/tx_bytes_per_step_max": 1000.0}
    # the same metric names at any number of workers: runs of different sizes line up in the MLflow UI
    assert set(placement_metrics(workers[:1])) == set(m)


def test_link_bytes_count_this_hosts_interfaces_without_loopback():
    got = link_bytes()
    assert set(got) == {"rx", "tx"} and min(got.values()) >= 0


@pytest.mark.parametrize("override, field", [("train.scaling.placement_strategy=ANYWHERE", "train.scaling.placement_strategy"),
                                             ("train.failure.restart_timeout_s=0", "train.failure.restart_timeout_s")])
def test_cluster_settings_are_checked(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, [override])
    assert load_config(None, ["train.scaling.placement_strategy=STRICT_SPREAD"]).train.scaling.placement_strategy == "STRICT_SPREAD"


def test_an_explicit_cpu_reservation_that_leaves_ray_data_no_cpu_is_refused():
    check_cpu_reservation(1, 1, 2.0)  # one worker of one CPU on a 2-core laptop: one left for Ray Data
    check_cpu_reservation(2, 3, 8.0)
    with pytest.raises(ConfigError, match=r"cpus_per_worker=1 x train.scaling.num_workers=2 reserves 2 of the "
                                          r"cluster's 2 CPUs.*would hang"):
        check_cpu_reservation(2, 1, 2.0)  # the hang this guards against: both CPUs held, Ray Data waits forever
    with pytest.raises(ConfigError, match="reserves 4 of the cluster's 4 CPUs"):
        check_cpu_reservation(1, 4, 4.0)
