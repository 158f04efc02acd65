"""Mooncake's replicas through the plugin (``replica_num`` in the extra config), against a real mooncake_master on
loopback: a page written with two copies is still read whole by another server after the client that held one copy
is killed (kill -9, its segment gone once the master's client_ttl passes); with one copy, that client's share of
the pages is lost (the control: the test can fail)."""

import subprocess
import sys
import time

import pytest
from test_mooncake_backend import PS, make

from hicache_core.errors import ConfigError
from hicache_core.testing import fill_random, page_bytes, random_keys
from hicache_plugin_mooncake import MooncakeStoreConfig

from conftest import Master

TTL = 2  # seconds the master keeps a silent client's segment (its default is 10)
PAGES = 24

# another server's memory in the store: a plain Mooncake client that contributes a segment and waits to be killed
HOLDER = """
import sys, time
from mooncake.store import MooncakeDistributedStore
store = MooncakeDistributedStore()
rc = store.setup("127.0.0.1", sys.argv[1], 64 << 20, 16 << 20, "tcp", "", sys.argv[2])
print(rc, flush=True)
time.sleep(600)
"""


@pytest.fixture
def short_ttl_master(tmp_path):
    m = Master(str(tmp_path), f"--client_ttl={TTL}")
    m.start()
    yield m
    m.stop()


def _holder(master) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, master.metadata, master.address], stdout=subprocess.PIPE, text=True
    )
    line = p.stdout.readline().strip()  # type: ignore[union-attr]
    if line != "0":
        p.kill()
        pytest.fail(f"the segment holder could not join the store (setup returned {line!r})")
    return p


def _pages_read_after_a_holder_dies(master, replicas: int) -> tuple[int, bool]:
    holder = _holder(master)
    writer, wpool = make(master, replica_num=replicas)
    # the reader contributes no memory: every page it reads lives on the writer's or the holder's segment
    reader, rpool = make(master, global_segment_size="0")
    try:
        keys = random_keys(PAGES, PS)
        src = wpool.alloc(PAGES * PS)
        fill_random(wpool, src)
        assert writer.batch_set_v1(keys, src) == [True] * PAGES
        holder.kill()
        holder.wait(timeout=10)
        time.sleep(3 * TTL)  # the master drops the dead client and its copies
        dst = rpool.alloc(PAGES * PS)
        got = reader.batch_get_v1(keys, dst)
        return sum(got), all(got) and page_bytes(rpool, dst) == page_bytes(wpool, src)
    finally:
        if holder.poll() is None:
            holder.kill()
        reader.close()
        writer.close()


def test_two_replicas_outlive_a_killed_client(short_ttl_master):
    read, whole = _pages_read_after_a_holder_dies(short_ttl_master, replicas=2)
    assert read == PAGES and whole


def test_one_replica_loses_the_killed_clients_share(short_ttl_master):
    read, _ = _pages_read_after_a_holder_dies(short_ttl_master, replicas=1)
    assert read < PAGES  # the holder's pages are gone (the store spreads pages over both segments)


def test_replica_num_is_checked():
    base = {"master_server_address": "127.0.0.1:1"}
    assert MooncakeStoreConfig.from_mapping({**base, "replica_num": 3}, "x").replica_num == 3
    with pytest.raises(ConfigError, match="replica_num"):
        MooncakeStoreConfig.from_mapping({**base, "replica_num": 0}, "x")
