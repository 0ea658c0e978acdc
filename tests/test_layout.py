"""RoleLayout with made-up world sizes and hosts. No MPI."""

import pytest

from mpips.layout import LayoutError, Role, RoleLayout


def test_default_layout_on_one_node():
    lay = RoleLayout.from_counts(4, servers=1, data_servers=1)
    assert lay.workers == (0, 1) and lay.data_servers == (2,) and lay.servers == (3,)
    assert lay.lead_worker == 0
    assert [lay.role_of(r) for r in range(4)] == [Role.WORKER, Role.WORKER, Role.DATA, Role.SERVER]
    assert lay.index_of(1) == 1 and lay.index_of(3) == 0


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("servers, data", [(1, 0), (1, 1), (2, 1), (2, 2), (3, 0)])
def test_every_rank_has_exactly_one_role(world, servers, data):
    if servers + data >= world:
        with pytest.raises(LayoutError):
            RoleLayout.from_counts(world, servers, data)
        return
    lay = RoleLayout.from_counts(world, servers, data)
    ranks = sorted(lay.servers + lay.data_servers + lay.workers)
    assert ranks == list(range(world))
    assert (len(lay.servers), len(lay.data_servers)) == (servers, data)


def test_error_names_the_counts():
    with pytest.raises(LayoutError, match="6 ranks cannot hold 2 parameter servers \\+ 4 data servers"):
        RoleLayout.from_counts(6, 2, 4)
    with pytest.raises(LayoutError, match=r"^1 rank cannot hold 1 parameter server \+ 1 data server \+ at least 1"
                       r" worker: launch with at least 3 ranks \(mpirun -n 3\)"):
        RoleLayout.from_counts(1, 1, 1)


def test_servers_spread_across_nodes():
    hosts = ["a"] * 4 + ["b"] * 4
    lay = RoleLayout.from_counts(8, servers=2, data_servers=2, hosts=hosts)
    assert {hosts[r] for r in lay.servers} == {"a", "b"}
    assert {hosts[r] for r in lay.data_servers} == {"a", "b"}
    assert lay.lead_worker == 0 and lay.local_rank(5) == 1


def test_describe_lists_every_rank():
    text = RoleLayout.from_counts(3, 1, 0, hosts=["n1", "n1", "n2"]).describe()
    assert text.splitlines()[0] == "role map: 3 ranks = 1 parameter server + 0 data servers + 2 workers"
    assert len(text.splitlines()) == 2 + 3
    text = RoleLayout.from_counts(4, 2, 1).describe()
    assert text.splitlines()[0] == "role map: 4 ranks = 2 parameter servers + 1 data server + 1 worker"


def test_plural():
    from mpips.text import plural

    assert [plural(n, "server") for n in (0, 1, 2)] == ["0 servers", "1 server", "2 servers"]
    assert plural(1, "replica") == "1 replica" and plural(26122, "parameter") == "26,122 parameters"
    assert plural(2, "child", "children") == "2 children"
