"""The limiter on a real Redis Cluster: three masters on loopback ports, made with
`redis-cli --cluster create`. Every limiter key of a provider carries its `{provider}` hash
tag, so each script touches one slot; the limiter's own tests run here unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from producer.ops.stack import LocalStack
from tests import test_limiter
from tests.conftest import CONFIGS, missing
from workers.embedded import free_cluster_port, start_cluster
from workers.env import Env
from workers.errors import ConfigError, ServiceUnavailable
from workers.redisconn import connect

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    try:
        nodes = start_cluster(3)
    except ServiceUnavailable as exc:
        missing(str(exc))
    client = connect(nodes.url())
    yield client
    client.close()
    nodes.stop()


def test_cluster_ports_leave_room_for_the_cluster_bus() -> None:
    # Redis refuses a cluster node above port 55535 (its bus listens 10000 higher); the kernel's
    # ephemeral range reaches 60999, which once failed all three tries of a CI run.
    ports = [free_cluster_port() for _ in range(50)]
    assert all(port <= 55535 for port in ports)


LIMITER_TESTS = [
    test_limiter.test_rolling_bucket_refills_continuously,
    test_limiter.test_debit_is_all_or_nothing,
    test_limiter.test_daily_window_resets_at_midnight_utc,
    test_limiter.test_concurrency_leases_expire_on_their_own,
    test_limiter.test_settle_refunds_once_and_releases_the_lease,
    test_limiter.test_block_extends_never_shortens,
    test_limiter.test_circuit_opens_after_failures_then_lets_one_probe,
    test_limiter.test_keys_rotate_by_room_and_a_disabled_key_is_skipped,
    test_limiter.test_pending_work_is_counted_and_taken_off_at_acquire,
    test_limiter.test_every_key_carries_the_provider_hash_tag,
    test_limiter.test_reservations_queue_up_one_refill_apart,
    test_limiter.test_a_reservation_is_redeemed_at_its_time_without_a_second_debit,
    test_limiter.test_a_429_without_headers_halves_the_limit_which_recovers_slowly,
    test_limiter.test_input_counted_unlike_the_estimate_is_learned_and_reserved_for,
]


@pytest.mark.parametrize("limiter_test", LIMITER_TESTS, ids=lambda t: t.__name__)
def test_the_limiter_on_a_redis_cluster(cluster: RedisCluster, limiter_test) -> None:
    cluster.flushdb(target_nodes=RedisCluster.PRIMARIES)  # this suite's own private cluster
    limiter_test(cluster)


def test_a_cluster_limiter_needs_a_broker_of_its_own() -> None:
    with pytest.raises(ConfigError, match=r"\$CELERY_BROKER_URL"):
        Env.from_environ({"SPILLWAY_REDIS_URL": "redis+cluster://127.0.0.1:7000"})
    env = Env.from_environ(
        {
            "SPILLWAY_REDIS_URL": "redis+cluster://127.0.0.1:7000",
            "CELERY_BROKER_URL": "redis://127.0.0.1:6379/3",
            "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/3",
        }
    )
    assert env.broker == "redis://127.0.0.1:6379/3"


def test_a_batch_runs_with_the_limiter_on_a_cluster_and_the_broker_on_its_own_redis(
    cluster: RedisCluster, redis_server, tmp_path
) -> None:
    nodes = cluster.get_primaries()
    url = f"redis+cluster://{nodes[0].host}:{nodes[0].port}"
    broker = redis_server.url(12)
    redis.Redis.from_url(broker).flushdb()
    stack = LocalStack(
        CONFIGS / "batch.toml",
        redis_url=url,
        celery_broker_url=broker,
        celery_result_backend=broker,
        workdir=str(tmp_path),
    )
    stack.start()
    try:
        stack.start_worker(concurrency=8, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client:
            items = [{"custom_id": f"c{i}", "prompt": f"item {i}"} for i in range(30)]
            handle = client.submit_batch(items, task="work", tier="free")
            progress = handle.wait(120)
            records = list(handle.results())
        limiter_keys = [k for k in cluster.scan_iter("spillway:{*") if b"}:a:" in k]
    finally:
        stack.close()
    assert progress.succeeded == 30 and [r["custom_id"] for r in records] == [f"c{i}" for i in range(30)]
    assert limiter_keys  # the buckets live on the cluster…
    assert not redis.Redis.from_url(broker).keys("spillway:{*")  # …and not on the broker's Redis
