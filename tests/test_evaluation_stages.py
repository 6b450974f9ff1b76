"""Stage caching: same key skips, a changed setting or upstream re-runs, a crashed stage re-runs clean."""

from pathlib import Path

import pytest

from tracealign_jax.evaluation.stages import StageRunner, stage_key


def test_stage_cache(tmp_path: Path):
    calls = []

    def make(tag):
        def fn(d: Path):
            calls.append(tag)
            (d / "out.txt").write_text(tag)
            return {"tag": tag}
        return fn

    r = StageRunner(tmp_path, log=lambda s: None)
    k1, res = r.run("a", {"x": 1}, (), make("first"))
    assert res == {"tag": "first"} and calls == ["first"]
    k1b, res = r.run("a", {"x": 1}, (), make("second"))
    assert (k1b, res, calls) == (k1, {"tag": "first"}, ["first"]) and r.skipped == ["a"]
    k2, res = r.run("a", {"x": 2}, (), make("third"))
    assert k2 != k1 and res == {"tag": "third"} and (tmp_path / "a" / "out.txt").read_text() == "third"
    assert stage_key("b", {}, (k1,)) != stage_key("b", {}, (k2,))

    def boom(d: Path):
        (d / "partial").write_text("x")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        r.run("c", {}, (), boom)
    assert not (tmp_path / "c" / "stage.json").exists()
    r.run("c", {}, (), make("clean"))
    assert not (tmp_path / "c" / "partial").exists()
    assert StageRunner(tmp_path, log=lambda s: None, force=True).run("a", {"x": 2}, (), make("forced"))[1] == {"tag": "forced"}
