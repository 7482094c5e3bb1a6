"""The workspace's publish protocol, on a local folder and on two real S3-protocol servers
(moto and SeaweedFS on 127.0.0.1): versions written privately, one create-if-absent commit,
readers that only ever see whole versions, crash garbage swept, key validation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from medcurate.errors import AlreadyExists, MedcurateError, NotFound
from medcurate.workspace import (ARTEFACT_KINDS, ARTEFACTS, COMMITS_DIR, PROVENANCE_FILE,
                                 VERSIONS_DIR, Workspace, shaping_fields, validate_key)

STORES = ["local", "moto", "seaweedfs"]


@pytest.fixture(params=STORES)
def store_ws(request, tmp_path, monkeypatch) -> Workspace:
    """A fresh workspace on each kind of store; S3 ones reached through the AWS_* variables,
    as a user's shell or a Ray worker reaches them."""
    if request.param == "local":
        return Workspace(str(tmp_path / "ws"))
    server = request.getfixturevalue("moto_s3" if request.param == "moto" else "seaweed_s3")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"ws-{uuid.uuid4().hex[:10]}"
    server.make_bucket(bucket)
    return Workspace(f"s3://{bucket}/medcurate")


def _publish(ws: Workspace, key: str, payload: str, overwrite: bool = False) -> None:
    """An artefact of three files that all carry ``payload``, one of them nested."""
    with ws.stage("collections", key, overwrite=overwrite) as staging:
        ws.write_bytes(f"{staging}/a.txt", payload.encode())
        ws.write_bytes(f"{staging}/sub/b.txt", payload.encode())
        ws.write_json(f"{staging}/{PROVENANCE_FILE}", {"payload": payload, "outputs": {}})


def _read_artefact(ws: Workspace, key: str) -> tuple[str, str, str]:
    folder = ws.require("collections", key)
    return (ws.read_bytes(f"{folder}/a.txt").decode(), ws.read_bytes(f"{folder}/sub/b.txt").decode(),
            ws.read_json(f"{folder}/{PROVENANCE_FILE}")["payload"])


def _versions(ws: Workspace, key: str) -> list[str]:
    return [i.base_name for i in ws.listing(f"{ws.artefact_root('collections', key)}/{VERSIONS_DIR}")]


def test_publish_is_visible_only_at_commit_and_hashes_every_file(store_ws):
    ws = store_ws
    with ws.stage("collections", "c1") as staging:
        ws.write_bytes(f"{staging}/a.txt", b"payload")
        ws.write_bytes(f"{staging}/sub/b.txt", b"nested")
        ws.write_json(f"{staging}/{PROVENANCE_FILE}", {"kind": "x", "outputs": {"a.txt": {
            "rows": 3, "sha256": "written-by-caller-and-wrong"}}})
        assert ws.list("collections") == [] and not ws.exists("collections", "c1")
    assert ws.list("collections") == ["c1"]
    outputs = ws.provenance("collections", "c1")["outputs"]
    import hashlib
    assert outputs == {
        "a.txt": {"rows": 3, "sha256": hashlib.sha256(b"payload").hexdigest(), "bytes": 7},
        "sub/b.txt": {"sha256": hashlib.sha256(b"nested").hexdigest(), "bytes": 6}}
    assert ws.read_bytes(ws.path("collections", "c1", "sub", "b.txt")) == b"nested"


def test_stage_without_provenance_publishes_nothing(store_ws):
    ws = store_ws
    with pytest.raises(RuntimeError, match="no provenance"):
        with ws.stage("collections", "c1") as staging:
            ws.write_bytes(f"{staging}/a.txt", b"payload")
    assert ws.list("collections") == [] and _versions(ws, "c1") == []


def test_failed_overwrite_keeps_earlier_artefact_and_leaves_no_version(store_ws):
    ws = store_ws
    _publish(ws, "c1", "original")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with ws.stage("collections", "c1", overwrite=True) as staging:
            ws.write_bytes(f"{staging}/a.txt", b"half-written replacement")
            raise Boom()
    assert _read_artefact(ws, "c1") == ("original",) * 3
    assert len(_versions(ws, "c1")) == 1


def test_overwrite_replaces_the_whole_artefact(store_ws):
    ws = store_ws
    _publish(ws, "c1", "original")
    with ws.stage("collections", "c1", overwrite=True) as staging:
        ws.write_json(f"{staging}/{PROVENANCE_FILE}", {"payload": "replaced"})
    folder = ws.require("collections", "c1")
    assert sorted(i.base_name for i in ws.listing(folder)) == [PROVENANCE_FILE]
    assert ws.provenance("collections", "c1")["payload"] == "replaced"


def test_existing_key_without_overwrite_is_refused_before_work(store_ws):
    ws = store_ws
    _publish(ws, "c1", "original")
    entered = False
    with pytest.raises(AlreadyExists, match="already exists"):
        with ws.stage("collections", "c1"):
            entered = True
    assert not entered and _read_artefact(ws, "c1") == ("original",) * 3


def test_of_concurrent_writers_exactly_one_wins(store_ws):
    """Eight writers of one new key pass the early check together; one commit is created."""
    ws = store_ws
    barrier, outcomes = threading.Barrier(8), []

    def writer(index: int) -> None:
        own = Workspace(ws.uri)
        folder = own.new_draft("collections", "race")
        own.write_bytes(f"{folder}/a.txt", f"w{index}".encode())
        own.write_bytes(f"{folder}/sub/b.txt", f"w{index}".encode())
        own.write_json(f"{folder}/{PROVENANCE_FILE}", {"payload": f"w{index}"})
        barrier.wait(timeout=60)
        try:
            own.publish("collections", "race", folder)
            outcomes.append(("won", index))
        except AlreadyExists:
            outcomes.append(("lost", index))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [i for outcome, i in outcomes if outcome == "won"]
    assert len(outcomes) == 8 and len(winners) == 1, outcomes
    assert _read_artefact(ws, "race") == (f"w{winners[0]}",) * 3


def test_readers_never_see_a_missing_or_mixed_artefact_during_overwrites(store_ws):
    ws = store_ws
    _publish(ws, "live", "v0")
    stop, seen, problems = threading.Event(), set(), []

    def reader() -> None:
        own = Workspace(ws.uri)
        while not stop.is_set():
            try:
                values = _read_artefact(own, "live")
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                problems.append(repr(exc))
                return
            if len(set(values)) != 1:
                problems.append(f"mixed versions {values}")
            seen.add(values[0])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for index in range(1, 9):
            _publish(ws, "live", f"v{index}", overwrite=True)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert problems == []
    assert _read_artefact(ws, "live") == ("v8",) * 3
    assert len(seen) >= 2, "the reader never overlapped an overwrite"


_KILLED_WRITER = """
import sys, time
from medcurate.workspace import PROVENANCE_FILE, Workspace
ws = Workspace(sys.argv[1])
with ws.stage("collections", "c1", overwrite=True) as staging:
    ws.write_bytes(f"{staging}/a.txt", b"replacement")
    print("written", flush=True)
    time.sleep(600)
    ws.write_bytes(f"{staging}/sub/b.txt", b"replacement")
    ws.write_json(f"{staging}/{PROVENANCE_FILE}", {"payload": "replacement"})
"""


def test_a_writer_killed_before_its_commit_leaves_the_earlier_artefact_and_gc_sweeps(store_ws):
    ws = store_ws
    _publish(ws, "c1", "original")
    live = ws.head("collections", "c1")
    process = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, ws.uri],
                               stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert process.stdout.readline().strip() == "written"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert _read_artefact(ws, "c1") == ("original",) * 3
    drafts = [v for v in _versions(ws, "c1") if v != live.version]
    assert len(drafts) == 1  # the killed writer's draft is garbage now
    assert ws.gc(grace_seconds=3600) == []  # young garbage is kept: it may be a live writer
    assert ws.gc(grace_seconds=0) == [f"collections/c1/{VERSIONS_DIR}/{drafts[0]}"]
    assert _versions(ws, "c1") == [live.version]
    assert _read_artefact(ws, "c1") == ("original",) * 3


def test_gc_removes_superseded_versions_and_old_commits_but_never_the_live_one(store_ws):
    ws = store_ws
    for index in range(3):
        _publish(ws, "c1", f"v{index}", overwrite=bool(index))
    before = _versions(ws, "c1")
    assert len(before) == 3  # superseded versions stay within the grace period
    live = ws.head("collections", "c1")
    removed = ws.gc(grace_seconds=0)
    assert sorted(removed) == sorted(f"collections/c1/{VERSIONS_DIR}/{v}" for v in before
                                     if v != live.version)
    commits = [i.base_name for i in
               ws.listing(f"{ws.artefact_root('collections', 'c1')}/{COMMITS_DIR}")]
    assert commits == [f"{live.seq:012d}.json"]
    assert _read_artefact(ws, "c1") == ("v2",) * 3
    _publish(ws, "c1", "v3", overwrite=True)  # the chain goes on after old commits are gone
    assert _read_artefact(ws, "c1") == ("v3",) * 3


def test_amend_adds_a_file_as_a_new_version_and_loses_to_a_newer_writer(store_ws):
    """What is made later from an artefact (a selection's report) is added as a new whole
    version: the earlier files carried over, every hash brought up to date. Where another
    writer published the artefact after the amend read it, the amend publishes nothing."""
    import hashlib

    from artefacts import assert_outputs_match_their_hashes

    ws = store_ws
    _publish(ws, "c1", "original")
    before = ws.head("collections", "c1")
    assert ws.amend("collections", "c1", {"report.html": b"<html>drawn later</html>"})
    assert ws.head("collections", "c1").seq == before.seq + 1
    assert _read_artefact(ws, "c1") == ("original",) * 3
    record = assert_outputs_match_their_hashes(ws, "collections", "c1")
    assert record["outputs"]["report.html"]["sha256"] == hashlib.sha256(
        b"<html>drawn later</html>").hexdigest()

    def overwrite_first(kind, key, folder, overwrite=False, based_on=None):
        """An overwrite lands between the amend's read and its commit."""
        del ws.publish  # the overwrite itself publishes as usual
        _publish(ws, "c1", "newer", overwrite=True)
        return ws.publish(kind, key, folder, overwrite=overwrite, based_on=based_on)

    ws.publish = overwrite_first
    assert not ws.amend("collections", "c1", {"late.txt": b"for the older version"})
    assert "publish" not in vars(ws)
    assert _read_artefact(ws, "c1") == ("newer",) * 3
    assert not ws.is_file(ws.path("collections", "c1", "late.txt"))
    assert len(_versions(ws, "c1")) == 3  # original, amended, newer: the loser's draft is gone
    with pytest.raises(NotFound):
        ws.amend("collections", "missing", {"x": b""})


def test_write_bytes_on_a_local_disk_leaves_no_temporary_file(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    target = f"{ws.root}/jobs/j1/file.bin"
    ws.write_bytes(target, b"first version")
    ws.write_bytes(target, b"second")
    assert Path(target).read_bytes() == b"second"
    assert os.listdir(Path(target).parent) == ["file.bin"]


def test_an_artefact_from_before_versions_is_read_in_place(tmp_path):
    """Workspaces written by earlier releases (files straight in <kind>/<key>/) stay readable,
    and an overwrite publishes a version over them."""
    ws = Workspace(str(tmp_path / "ws"))
    legacy = Path(ws.root) / "collections" / "old"
    legacy.mkdir(parents=True)
    (legacy / "a.txt").write_text("legacy")
    (legacy / PROVENANCE_FILE).write_text('{"payload": "legacy"}')
    assert ws.list("collections") == ["old"]
    assert ws.read_bytes(ws.path("collections", "old", "a.txt")) == b"legacy"
    _publish(ws, "old", "new", overwrite=True)
    assert _read_artefact(ws, "old") == ("new",) * 3


@pytest.mark.parametrize("key", ["../x", "a/b", "", ".hidden", "..", "a b", "x\n", "/abs",
                                 "a" * 129])
def test_invalid_keys_are_refused(tmp_path, key):
    ws = Workspace(str(tmp_path / "ws"))
    with pytest.raises(MedcurateError, match="invalid name"):
        validate_key(key)
    with pytest.raises(MedcurateError, match="invalid name"):
        ws.path("collections", key)
    with pytest.raises(MedcurateError, match="invalid name"):
        with ws.stage("collections", key):
            pass
    assert not Path(ws.root).exists()


@pytest.mark.parametrize("key", ["a", "brain-tumor_v1.2", "A" * 128])
def test_valid_keys_are_accepted(key):
    assert validate_key(key) == key


def test_list_shows_only_published_artefacts_and_ignores_stray_folders(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    _publish(ws, "done", "x")
    base = Path(ws.root) / "collections"
    (base / "half" / VERSIONS_DIR / "v").mkdir(parents=True)  # a crashed writer's draft
    (base / "half" / VERSIONS_DIR / "v" / "manifest.parquet").write_bytes(b"partial")
    (base / "not a key").mkdir()  # a folder a user made by hand
    (base / "not a key" / PROVENANCE_FILE).write_text("{}")
    assert ws.list("collections") == ["done"]
    assert ws.list("selections") == []
    with pytest.raises(NotFound, match=r"known: done"):
        ws.require("collections", "half")


# -- artefact kinds: keys, reuse, lookup by config --------------------------------------------
def _selections(ws: Workspace) -> str:
    """A synthetic embedding run and three real selections of it (``<strategy>-s<seed>``);
    returns the run's id."""
    import numpy as np

    from medcurate.config import SelectConfig
    from medcurate.select.run import run_selection
    from medcurate.synthetic import write_embedding_run

    run = write_embedding_run(ws, "syn", np.random.default_rng(0).normal(size=(40, 4)),
                              ["a", "b"] * 20)
    for strategy, seed in (("random", 0), ("random", 1), ("kcenter", 0)):
        run_selection(SelectConfig(embedding_run=run, budget_per_class=3, strategy=strategy,
                                   seed=seed, selection_id=f"{strategy}-s{seed}"), ws)
    return run


def test_find_returns_the_artefacts_made_with_the_given_settings(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    run = _selections(ws)
    (Path(ws.root) / "selections" / "crashed" / VERSIONS_DIR / "v").mkdir(parents=True)
    assert ws.find("selections", strategy="random") == ["random-s0", "random-s1"]
    assert ws.find("selections", strategy="random", seed=1) == ["random-s1"]
    assert ws.find("selections", embedding_run=run, budget_per_class=3) == [
        "kcenter-s0", "random-s0", "random-s1"]
    assert ws.find("selections", splits=()) == ws.find("selections")  # as recorded: []
    assert ws.find("selections", strategy="random", seed=2) == []  # one field differs
    assert ws.find("selections", strategy="stratified") == []
    assert ws.find("embeddings", collection="syn") == [run]
    assert ws.find("audits") == []
    with pytest.raises(MedcurateError, match="unknown artefact kind 'selection'"):
        ws.find("selection", seed=0)


def test_a_taken_key_gets_its_kinds_policy_returned_or_refused(tmp_path):
    """Embedding runs are returned as they are, selections refused; --overwrite reuses none."""
    ws = Workspace(str(tmp_path / "ws"))
    run = _selections(ws)
    assert ARTEFACTS["embeddings"].reuse == "return-existing"
    assert ws.existing("embeddings", run, overwrite=False)["key"] == run
    assert ws.existing("embeddings", run, overwrite=True) is None
    assert ws.existing("embeddings", "absent", overwrite=False) is None
    assert ARTEFACTS["selections"].reuse == "refuse-unless-overwrite"
    with pytest.raises(AlreadyExists, match="selection 'random-s0' already exists.*--selection-id"):
        ws.existing("selections", "random-s0", overwrite=False, rename="--selection-id NEW")
    assert ws.existing("selections", "random-s0", overwrite=True) is None


def test_reusable_returns_an_identical_artefact_and_names_the_settings_that_differ(tmp_path):
    from medcurate.config import SelectConfig

    ws = Workspace(str(tmp_path / "ws"))
    run = _selections(ws)
    config = SelectConfig(embedding_run=run, budget_per_class=3, strategy="random", seed=1,
                          selection_id="random-s1")
    fields = shaping_fields(config)
    assert "overwrite" not in fields and "strategy" in fields
    assert ws.reusable("selections", "absent", config.model_dump(), fields) is None
    record = ws.reusable("selections", "random-s1", config.model_dump(), fields)
    assert record["key"] == "random-s1" and record["config"]["seed"] == 1
    replacing = config.model_copy(update={"overwrite": True})
    assert ws.reusable("selections", "random-s1", replacing.model_dump(), fields) is not None
    other = config.model_copy(update={"seed": 0, "budget_per_class": 4})
    with pytest.raises(MedcurateError, match=r"selection 'random-s1' in .* exists with other "
                       r"settings \(budget_per_class, seed\); pass --name NEW or --overwrite"):
        ws.reusable("selections", "random-s1", other.model_dump(), fields,
                    "pass --name NEW or --overwrite")
    # A field added to the config after the artefact was made counts as None, its default.
    newer = {**config.model_dump(), "added_later": None}
    assert ws.reusable("selections", "random-s1", newer, fields | {"added_later"}) is not None
    with pytest.raises(MedcurateError, match=r"\(added_later\)"):
        ws.reusable("selections", "random-s1", {**newer, "added_later": 2},
                    fields | {"added_later"})


def test_every_command_publishes_to_a_declared_kind_under_a_field_it_names():
    """The table covers each kind a command publishes to, and the key field is one the
    command's config sets (its result echoes it) or, where the config calls it otherwise,
    the result field named here."""
    from medcurate.commands import COMMANDS

    result_only = {"ingest": "collection",  # config: name; its summary: "collection"
                   "curate": None}  # its result nests the selection's under "selection"
    for kind, command in COMMANDS.items():
        if command.artefact is None:
            continue
        declared = ARTEFACTS[command.artefact]
        if kind in result_only:
            assert result_only[kind] in (*declared.key_fields, None), kind
        else:
            assert set(declared.key_fields) & set(command.config.model_fields), kind
    assert ARTEFACT_KINDS == tuple(ARTEFACTS)
    assert {a.reuse for a in ARTEFACTS.values()} == {"return-existing",
                                                     "refuse-unless-overwrite"}


def test_a_jobs_artefact_is_read_from_its_commands_key_field(tmp_path):
    """The job view links what the result's key field names, and only a live artefact."""
    from service.api import _artefact_of

    ws = Workspace(str(tmp_path / "ws"))
    run = _selections(ws)
    assert _artefact_of(ws, {"kind": "embed", "result": {"run_id": run}}) == ("embeddings", run)
    assert _artefact_of(ws, {"kind": "select", "result": {
        "selection_id": "random-s0", "embedding_run": run}}) == ("selections", "random-s0")
    # Another field naming an artefact of the kind is not the one the job made.
    assert _artefact_of(ws, {"kind": "select", "result": {"other": "random-s0"}}) is None
    assert _artefact_of(ws, {"kind": "select", "result": {"selection_id": "gone"}}) is None
    assert _artefact_of(ws, {"kind": "select", "result": {"selection_id": "../x"}}) is None
    assert _artefact_of(ws, {"kind": "select", "status": "FAILED"}) is None
    assert _artefact_of(ws, {"kind": "unknown", "result": {"run_id": run}}) is None


def test_a_comparison_reuses_a_selection_only_where_it_was_made_with_the_same_settings(
        tmp_path):
    from medcurate.config import CompareConfig, SelectConfig
    from medcurate.select.run import run_selection
    from medcurate.train.compare import _selection

    ws = Workspace(str(tmp_path / "ws"))
    run = _selections(ws)
    config = CompareConfig(embedding_run=run, strategies=["random"], budgets=[3], seeds=[0])

    def select(comparison: CompareConfig) -> str:
        return _selection(comparison, ws, "random", 3, 0, "cmp", None)

    key = select(config)
    made = ws.head("selections", key)
    assert select(config) == key and ws.head("selections", key) == made  # reused
    select(config.model_copy(update={"overwrite": True}))
    remade = ws.head("selections", key)
    assert remade != made
    select(config)  # --overwrite does not shape a selection: the remade one is reused
    assert ws.head("selections", key) == remade
    run_selection(SelectConfig(embedding_run=run, budget_per_class=4, strategy="random",
                               splits=["train"], selection_id=key, overwrite=True), ws)
    with pytest.raises(MedcurateError, match=r"\(budget_per_class\); pass --overwrite or "
                       "--comparison-id NEW"):
        select(config)
