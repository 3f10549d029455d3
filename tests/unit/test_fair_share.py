"""Fair shares and which partitions an owner keeps, gives up and claims."""

from cqrskit.leases import fair_share, plan_claim


def test_fair_share_is_the_ceiling_of_partitions_per_live_owner() -> None:
    assert fair_share(8, 1) == 8
    assert fair_share(8, 2) == 4
    assert fair_share(8, 3) == 3
    assert fair_share(8, 0) == 8  # nobody seen yet: this process is the one
    assert fair_share(1, 4) == 1


def test_an_owner_claims_free_partitions_lowest_first() -> None:
    keep, release = plan_claim("a", 4, 8, {}, now=100.0)
    assert keep == {0, 1, 2, 3} and release == set()


def test_an_owner_gives_up_its_highest_partitions_beyond_its_share() -> None:
    leases = {p: ("a", 200.0) for p in range(8)}
    keep, release = plan_claim("a", 4, 8, leases, now=100.0)
    assert keep == {0, 1, 2, 3} and release == {4, 5, 6, 7}


def test_live_leases_of_others_are_left_alone_and_expired_ones_taken() -> None:
    leases = {0: ("b", 200.0), 1: ("b", 50.0), 2: ("a", 200.0)}
    keep, release = plan_claim("a", 3, 4, leases, now=100.0)
    assert keep == {1, 2, 3} and release == set()


def test_an_owner_keeps_its_own_expired_lease_nobody_took() -> None:
    keep, _ = plan_claim("a", 1, 2, {1: ("a", 50.0), 0: ("b", 200.0)}, now=100.0)
    assert keep == {1}
