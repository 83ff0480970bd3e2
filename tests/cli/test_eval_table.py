"""`aptp eval`'s table names targets relative to the folder they share."""

from aptp.cli.evaluate import short_names


def test_targets_relative_to_their_common_folder():
    names, common = short_names(["runs/study/gen/aptp-s0-g3", "runs/study/gen/uni-s0-g3/", "runs/study/real"])
    assert common == "runs/study" and names == ["gen/aptp-s0-g3", "gen/uni-s0-g3", "real"]


def test_nothing_shared_leaves_the_names():
    assert short_names(["toy", "runs/a"]) == (["toy", "runs/a"], None)
    assert short_names(["/abs/run", "rel/run"]) == (["/abs/run", "rel/run"], None)
    assert short_names(["runs/a"]) == (["runs/a"], None)
    assert short_names(["/a/x", "/b/y"]) == (["/a/x", "/b/y"], None)  # only the root in common
