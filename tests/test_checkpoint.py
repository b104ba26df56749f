"""Checkpoints on disk: round trips through real files, replacement, and refusal of missing or corrupt ones."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from downpour import checkpoint as ckpt
from downpour import rundir
from downpour.errors import CheckpointError
from downpour.ps.rules import SGD, Adagrad
from downpour.ps.shard import Shard


def _trained_shards(seed: int = 0, pushes: int = 3) -> list[Shard]:
    """Two Adagrad shards of different sizes, each pushed a few times (one NaN push rejected on shard 1)."""
    generator = torch.Generator().manual_seed(seed)
    shards = [Shard(i, 7 * i, torch.randn(7 - 2 * i, generator=generator), Adagrad(lr=0.1)) for i in range(2)]
    for shard in shards:
        for _ in range(pushes + shard.index):
            shard.push(torch.randn(shard.size, generator=generator), shard.version)
    shards[1].push(torch.full((shards[1].size,), float("nan")), 0)
    return shards


def _params_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("params-*.safetensors"))


def test_round_trip(tmp_path: Path) -> None:
    """Values, rule state, versions, rejected counts and the caller's state come back exactly."""
    directory = tmp_path / "checkpoint"
    shards = _trained_shards()
    snapshots = [shard.snapshot() for shard in shards]
    state = {"step": 42, "rule": "adagrad", "staleness_histogram": [5, 2, 1], "initial_loss": None}
    assert ckpt.save(directory, snapshots, state) == directory / ckpt.STATE_FILE

    loaded = ckpt.load(directory)
    assert {k: loaded.state[k] for k in state} == state
    assert loaded.state["format"] == ckpt.FORMAT
    assert [s["size"] for s in loaded.state["shards"]] == [7, 5]
    restored = loaded.shard_snapshots()
    assert len(restored) == 2
    for original, back in zip(snapshots, restored, strict=True):
        assert torch.equal(back["values"], original["values"])
        assert back["state"].keys() == {"sum_sq"}
        assert torch.equal(back["state"]["sum_sq"], original["state"]["sum_sq"])
        assert (back["version"], back["rejected"]) == (original["version"], original["rejected"])
    assert [(s["version"], s["rejected"]) for s in restored] == [(3, 0), (4, 1)]


def test_restored_shards_continue_identically(tmp_path: Path) -> None:
    """Shards restored from a checkpoint apply the next push exactly as the originals do."""
    shards = _trained_shards()
    ckpt.save(tmp_path, [shard.snapshot() for shard in shards], {})
    fresh = [Shard(i, 7 * i, torch.zeros(7 - 2 * i), Adagrad(lr=0.1)) for i in range(2)]
    for shard, snap in zip(fresh, ckpt.load(tmp_path).shard_snapshots(), strict=True):
        shard.restore(snap)
    for old, new in zip(shards, fresh, strict=True):
        update = torch.linspace(-1, 1, old.size)
        assert old.push(update, old.version) == new.push(update, new.version)
        assert torch.equal(old.snapshot()["values"], new.snapshot()["values"])
        assert torch.equal(old.snapshot()["state"]["sum_sq"], new.snapshot()["state"]["sum_sq"])


def test_round_trip_without_rule_state(tmp_path: Path) -> None:
    """SGD shards have no state tensors; their snapshots round-trip with an empty state."""
    shard = Shard(0, 0, torch.tensor([1.0, 2.0]), SGD(lr=1.0))
    shard.push(torch.tensor([1.0, 1.0]), 0)
    ckpt.save(tmp_path, [shard.snapshot()], {"step": 1})
    (snap,) = ckpt.load(tmp_path).shard_snapshots()
    assert snap["values"].tolist() == [0.0, 1.0]
    assert snap["state"] == {} and snap["version"] == 1


def test_second_save_replaces_first(tmp_path: Path) -> None:
    """A second save leaves exactly one params file (the new one), and load returns the new contents."""
    shards = _trained_shards(pushes=1)
    ckpt.save(tmp_path, [s.snapshot() for s in shards], {"step": 1})
    first = _params_files(tmp_path)
    assert len(first) == 1
    for shard in shards:
        shard.push(torch.ones(shard.size), shard.version)
    ckpt.save(tmp_path, [s.snapshot() for s in shards], {"step": 2})
    second = _params_files(tmp_path)
    assert len(second) == 1 and second != first
    loaded = ckpt.load(tmp_path)
    assert loaded.state["step"] == 2 and loaded.state["params_file"] == second[0]
    assert torch.equal(loaded.shard_snapshots()[0]["values"], shards[0].snapshot()["values"])
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file is left behind by a completed save


def test_many_saves_keep_one_params_file(tmp_path: Path) -> None:
    """Serial numbers keep increasing and older files are always removed."""
    shard = Shard(0, 0, torch.zeros(3), SGD(lr=1.0))
    for step in range(4):
        ckpt.save(tmp_path, [shard.snapshot()], {"step": step})
    assert _params_files(tmp_path) == ["params-00000003.safetensors"]
    assert ckpt.load(tmp_path).state["step"] == 3


def test_missing_directory(tmp_path: Path) -> None:
    """No checkpoint directory: CheckpointError naming it and the missing state file."""
    directory = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=r"no checkpoint") as info:
        ckpt.load(directory)
    assert str(directory) in str(info.value) and "state.json" in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "", '{"format": 1, "params_file": "p'])
def test_corrupt_state_json(tmp_path: Path, text: str) -> None:
    """A state.json that is not JSON: CheckpointError naming the file."""
    ckpt.save(tmp_path, [Shard(0, 0, torch.zeros(2), SGD(lr=1.0)).snapshot()], {})
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(CheckpointError, match="corrupt checkpoint file") as info:
        ckpt.load(tmp_path)
    assert str(tmp_path / "state.json") in str(info.value)


@pytest.mark.parametrize("payload", [[1, 2], {"format": 99, "params_file": "x"}, {"format": 1}, "text"])
def test_state_json_of_another_kind(tmp_path: Path, payload: object) -> None:
    """Valid JSON that is not a downpour checkpoint of this format is refused."""
    (tmp_path / "state.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="is not a downpour checkpoint"):
        ckpt.load(tmp_path)


def _save_one(directory: Path) -> Path:
    shard = Shard(0, 0, torch.arange(64, dtype=torch.float32), Adagrad(lr=0.1))
    shard.push(torch.ones(64), 0)
    ckpt.save(directory, [shard.snapshot()], {"step": 1})
    (params,) = directory.glob("params-*.safetensors")
    return params


@pytest.mark.parametrize("damage", ["truncate-half", "drop-tail", "garbage", "empty", "tiny"])
def test_corrupt_params_file(tmp_path: Path, damage: str) -> None:
    """A truncated or garbage params file: CheckpointError naming the file (not a safetensors exception)."""
    params = _save_one(tmp_path)
    data = params.read_bytes()
    damaged = {
        "truncate-half": data[: len(data) // 2],
        "drop-tail": data[:-4],
        "garbage": b"\x00\xffnot a safetensors file at all" * 10,
        "empty": b"",
        "tiny": b"abc",
    }[damage]
    params.write_bytes(damaged)
    with pytest.raises(CheckpointError, match="corrupt checkpoint parameters") as info:
        ckpt.load(tmp_path)
    assert str(params) in str(info.value)


def test_missing_params_file(tmp_path: Path) -> None:
    """state.json naming a params file that is gone: CheckpointError naming it."""
    params = _save_one(tmp_path)
    params.unlink()
    with pytest.raises(CheckpointError, match="parameters missing") as info:
        ckpt.load(tmp_path)
    assert str(params) in str(info.value)


def test_params_file_with_wrong_shard_size(tmp_path: Path) -> None:
    """A readable params file whose shard does not match the size recorded in state.json is refused."""
    params = _save_one(tmp_path)
    save_file({"shard0.values": torch.zeros(3), "shard0.state.sum_sq": torch.zeros(3)}, str(params))
    with pytest.raises(CheckpointError, match="shard 0 values missing or wrong size"):
        ckpt.load(tmp_path)


def test_params_file_missing_a_shard(tmp_path: Path) -> None:
    """A params file without one of the shards listed in state.json is refused."""
    params = _save_one(tmp_path)
    save_file({"other": torch.zeros(64)}, str(params))
    with pytest.raises(CheckpointError, match="shard 0"):
        ckpt.load(tmp_path)


def test_stale_temp_files_do_not_break_load_or_save(tmp_path: Path) -> None:
    """Leftovers of a killed writer (a half-written params temp and state temp) are ignored."""
    _save_one(tmp_path)
    (tmp_path / ".params-x.safetensors.tmp-123").write_bytes(b"half a file")
    (tmp_path / ".params-00000001.safetensors.tmp-456").write_bytes(b"\x00" * 10)
    (tmp_path / ".state.json.tmp-789").write_text('{"format": 1, "params_fi')
    loaded = ckpt.load(tmp_path)
    assert loaded.state["step"] == 1
    # One Adagrad push of g = 1 from G = 0 moves every value by lr·1/(√1 + eps) ≈ 0.1.
    torch.testing.assert_close(loaded.shard_snapshots()[0]["values"], torch.arange(64.0) - 0.1)
    # A new save still works next to the leftovers and is what load then returns.
    shard = Shard(0, 0, torch.full((64,), 5.0), SGD(lr=1.0))
    ckpt.save(tmp_path, [shard.snapshot()], {"step": 2})
    assert ckpt.load(tmp_path).shard_snapshots()[0]["values"].tolist() == [5.0] * 64
    assert len(_params_files(tmp_path)) == 1
    assert not list(tmp_path.glob(".*.tmp-*"))  # and the save cleared them away: they would pile up run after run


def test_crash_before_commit_leaves_old_checkpoint(tmp_path: Path) -> None:
    """A new params file written but state.json not yet replaced (killed mid-save): the old checkpoint loads."""
    _save_one(tmp_path)
    save_file({"shard0.values": torch.full((64,), 9.0)}, str(tmp_path / "params-00000001.safetensors"))
    loaded = ckpt.load(tmp_path)
    assert loaded.state["params_file"] == "params-00000000.safetensors"
    assert loaded.shard_snapshots()[0]["values"][0].item() == pytest.approx(-0.1)


def test_a_flipped_bit_inside_the_parameters_is_refused(tmp_path: Path) -> None:
    """A byte changed inside the tensors' data leaves a sound, finite file that every other check passes: the
    SHA-256 recorded in state.json refuses it (a resumed run took a flip for training that blew up: 48.6 -> 3e12).
    A checkpoint saved before the digest was recorded still loads."""
    params = _save_one(tmp_path)
    data = bytearray(params.read_bytes())
    data[-7] ^= 0x04  # in shard 0's last values: a finite float still
    params.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="its contents are not those saved") as info:
        ckpt.load(tmp_path)
    assert str(params) in str(info.value)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["params_sha256"]
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert ckpt.load(tmp_path).state["step"] == 1


def test_a_save_that_fails_at_its_commit_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """state.json is replaced by a rename, the commit point: when that rename fails (an I/O error), the save raises
    and the previous checkpoint still loads whole (its state and its parameters), with no temporary file left.
    Writing state.json in place instead would leave the new one, or half of it, behind a save that failed."""
    _save_one(tmp_path)
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(dst)).name == "state.json":
            raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    second = Shard(0, 0, torch.full((64,), 5.0), SGD(lr=1.0))
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.save(tmp_path, [second.snapshot()], {"step": 2})
    monkeypatch.undo()
    loaded = ckpt.load(tmp_path)
    assert loaded.state["step"] == 1 and loaded.state["params_file"] == "params-00000000.safetensors"
    torch.testing.assert_close(loaded.shard_snapshots()[0]["values"], torch.arange(64.0) - 0.1)  # Adagrad's 1st step
    assert not list(tmp_path.glob(".*.tmp-*"))


def _saved_with(directory: Path, values: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    ckpt.save(directory, [{"values": values, "state": state, "version": 0, "rejected": 0}], {"step": 0})


def test_a_rule_state_tensor_of_another_shape_is_refused(tmp_path: Path) -> None:
    """Each shard's rule state (Adagrad's sum of squares) must have the shape of its values: a (1,) sum_sq beside
    4 values would broadcast into every parameter on restore. Refused, naming the tensor and its shape."""
    _saved_with(tmp_path, torch.zeros(4), {"sum_sq": torch.ones(1)})
    with pytest.raises(CheckpointError, match=r"shard0\.state\.sum_sq has shape \(1,\)"):
        ckpt.load(tmp_path)


def test_integer_parameters_are_refused(tmp_path: Path) -> None:
    """Parameters are floats: an int32 tensor in the params file (written by something else) is refused, naming
    it and its dtype, rather than restored into float32 shards as if nothing were wrong."""
    _saved_with(tmp_path, torch.arange(4, dtype=torch.int32), {})
    with pytest.raises(CheckpointError, match=r"shard0\.values holds torch\.int32, not floats"):
        ckpt.load(tmp_path)


@pytest.mark.parametrize("key", ["dropped", "applied"])
@pytest.mark.parametrize("value", [-1, 2.5, "7"])
def test_a_sync_shards_counters_are_checked_as_the_others_are(tmp_path: Path, key: str, value: object) -> None:
    """A sync shard's late-push and applied-push counts in state.json are counters like version and rejected: a
    negative, fractional or text one is refused, naming the field (it would be restored as a count)."""
    _save_one(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    state["shards"][0][key] = value
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"shards\[0\]\.{key} must be an integer from 0 to 2\*\*53, got "):
        ckpt.load(tmp_path)


def test_a_sync_shards_late_push_count_survives_save_load_and_restore(tmp_path: Path) -> None:
    """Sync, two workers, one backup (quorum 1): worker 0 closes round 0 alone; worker 1's five pushes computed on
    version 0 are late, dropped = 5. Saved and loaded, the snapshot still says 5, and a sync shard restored from it
    counts 5 (a resumed run's count of late pushes restarted at 0)."""
    from test_shard import sync_shard_of_two

    first = sync_shard_of_two(torch.zeros(3), backup_workers=1)
    first.push(torch.ones(3), fetched_version=0, worker=0)
    for _ in range(5):
        first.push(torch.ones(3), fetched_version=0, worker=1)
    ckpt.save(tmp_path, [first.snapshot()], {"step": 6})
    (snapshot,) = ckpt.load(tmp_path).shard_snapshots()
    assert (snapshot["version"], snapshot["dropped"], snapshot["applied"]) == (1, 5, 1)
    again = sync_shard_of_two(torch.zeros(3), backup_workers=1)
    again.restore(snapshot)
    assert (again.version, again.dropped, again.applied) == (1, 5, 1)
    assert again.snapshot()["values"].tolist() == [-1.0, -1.0, -1.0]  # w = 0 − 1·mean of one push of ones


class _FakeCluster:
    """What :func:`downpour.watch.checkpoint_now` reads of a cluster: one shard of three values at a given step,
    and the restore points it is given (none yet: None)."""

    def __init__(self, values: list[float], step: int) -> None:
        self.values, self.step, self.restore_points = values, step, None

    def snapshots(self, wait: float | None = None) -> list[dict]:
        return [{"values": torch.tensor(self.values), "state": {}, "version": self.step, "rejected": 0}]

    def steps(self) -> int:
        return self.step

    def set_restore_points(self, snapshots: list[dict]) -> None:
        self.restore_points = snapshots


def test_checkpoint_now_saves_what_is_new_and_never_a_diverged_snapshot_over_a_good_one(tmp_path: Path) -> None:
    """When a checkpoint is written, walked through by hand: a periodic one at the step already on disk writes
    nothing (it would only stamp that checkpoint with this session's config); a new finite step is saved and
    becomes the restore point; a NaN snapshot is neither saved over it, periodic or final, nor a restore point;
    a session's final checkpoint is saved at an unchanged step; and a first session's diverged final one is saved
    (nothing to lose) and marked diverged. Called directly with a stand-in cluster, no training."""
    from downpour.config import Config
    from downpour.resume import RunState
    from downpour.watch import checkpoint_now

    def now(cluster: _FakeCluster, run_state: RunState, *, final: bool) -> tuple[bool, bool]:
        taken = checkpoint_now(tmp_path, cluster, Config(), run_state, [1, 2], signature,
                               lambda params: float(params.sum()), final=final)  # fmt: skip
        return taken.saved, taken.diverged

    def on_disk() -> tuple[int, bool] | None:
        if not (tmp_path / "checkpoint" / ckpt.STATE_FILE).exists():
            return None
        state = json.loads((tmp_path / "checkpoint" / ckpt.STATE_FILE).read_text())  # load() refuses NaN values
        return state["step"], state["diverged"]

    signature = {"num_params": 3, "param_shapes": {"w": [3]}}
    resumed = RunState(session=1, steps=20, checkpoint_step=20)  # a resume of the checkpoint of step 20
    same = _FakeCluster([1.0, 2.0, 3.0], 20)
    assert now(same, resumed, final=False) == (False, False) and on_disk() is None  # nothing new: nothing written
    assert same.restore_points is not None  # its finite values are still the shards' restore point
    good = _FakeCluster([1.0, 2.0, 4.0], 30)
    assert now(good, resumed, final=False) == (True, False)
    assert on_disk() == (30, False) and resumed.checkpoint_step == 30 and good.restore_points is not None
    bad = _FakeCluster([1.0, float("nan"), 4.0], 40)
    assert now(bad, resumed, final=False) == (False, True)
    assert now(bad, resumed, final=True) == (False, True)
    assert on_disk() == (30, False) and resumed.checkpoint_step == 30 and bad.restore_points is None
    assert now(_FakeCluster([1.0, 2.0, 4.0], 30), resumed, final=True) == (True, False)  # final: saved at step 30

    first = RunState()  # a first session, no checkpoint yet
    assert now(_FakeCluster([float("inf"), 0.0, 0.0], 7), first, final=True) == (True, True)
    assert on_disk() == (7, True) and first.checkpoint_step == 7


def test_fault_counts_add_this_sessions_to_the_earlier_sessions() -> None:
    """A resumed Ray run's shard restores and lost updates are the earlier sessions' (read back from the checkpoint)
    plus the ones its cluster reports for this session: 2 + 1 restores and 5 + 3 lost updates; a second count with
    the cluster reporting 2 and 4 gives 4 and 9 (the cluster's counts are this session's totals, not increments).
    A local cluster (no ``faults``) leaves the counters as they were."""
    from types import SimpleNamespace

    from downpour.resume import RunState
    from downpour.watch import _count_restores

    run_state = RunState(restores_before=2, lost_before=5, shard_restores=2, lost_updates=5)
    _count_restores(SimpleNamespace(), run_state)
    assert (run_state.shard_restores, run_state.lost_updates) == (2, 5)
    counts = {"shard_restores": 1, "lost_updates": 3}
    cluster = SimpleNamespace(faults=lambda: counts)
    _count_restores(cluster, run_state)
    assert (run_state.shard_restores, run_state.lost_updates) == (3, 8)
    counts.update(shard_restores=2, lost_updates=4)
    _count_restores(cluster, run_state)
    assert (run_state.shard_restores, run_state.lost_updates) == (4, 9)


@pytest.mark.parametrize(
    "when", ["before its tensors are read", "as its tensors are read", "before its digest is taken"]
)
def test_a_checkpoint_replaced_while_it_is_read_is_read_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A running driver's next save deletes the parameters file the previous state.json named: a reader (``eval``
    of a running run) that lost it so reads the new checkpoint, not "checkpoint parameters missing" or a bare
    FileNotFoundError (seen with checkpoints every 0.05 s: ``downpour eval`` failed on a healthy run)."""
    shard = Shard(0, 0, torch.zeros(4), SGD(lr=1.0))
    ckpt.save(tmp_path, [shard.snapshot()], {"step": 1})
    real_load_file, real_digest = ckpt.load_file, ckpt.file_sha256
    saved = []

    def save_meanwhile() -> None:
        if not saved:  # once: the driver's next periodic checkpoint lands now (its save takes a digest too)
            saved.append(2)
            ckpt.save(tmp_path, [shard.snapshot()], {"step": 2})

    def load_file(path: str) -> dict[str, torch.Tensor]:
        if when == "before its tensors are read":
            save_meanwhile()
        if when == "as its tensors are read" and not saved:  # torch maps the file by its name after safetensors
            save_meanwhile()  # read its header: seen as a RuntimeError, once in 3,340 reads of a running run
            raise RuntimeError(f"unable to open file <{path}> in read-only mode: No such file or directory (2)")
        return real_load_file(path)

    def file_sha256(path: Path) -> str:
        if when == "before its digest is taken":
            save_meanwhile()
        return real_digest(path)

    monkeypatch.setattr(ckpt, "load_file", load_file)
    monkeypatch.setattr(ckpt, "file_sha256", file_sha256)
    assert ckpt.load(tmp_path).state["step"] == 2
    assert saved


def test_a_session_removes_the_temporary_files_a_killed_driver_left_in_its_run_directory(tmp_path: Path) -> None:
    """A driver killed as it wrote summary.json or whitening.safetensors (atomically: a temporary file, then a
    rename) leaves ``.NAME.tmp-PID`` behind; the next session that claims the run directory removes those of
    processes that are gone, and keeps a live writer's (``downpour report`` beside it) and other dot files."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint").mkdir()
    (out / "config.toml").write_text("")  # a run's (a session writes it before any of these files)
    left = [out / f".summary.json.tmp-{dead}", out / f".whitening.safetensors.tmp-{dead}",
            out / "checkpoint" / f".state.json.tmp-{dead}"]  # fmt: skip
    for path in left:
        path.write_bytes(b"half written")
    live = out / f".report.html.tmp-{os.getpid()}"
    live.write_text("being written")
    other = out / ".notes.tmp-draft"
    other.write_text("not ours")
    with rundir.claimed(out):
        assert not any(path.exists() for path in left)
        assert live.exists() and other.exists()


def test_safetensors_own_temporary_files_of_a_killed_save_are_removed(tmp_path: Path) -> None:
    """safetensors' save_file writes into ``.tmpXXXXXX`` beside its target and renames it: a driver killed mid-write
    (4 of 6 kills during a save, by experiment) left a file as large as the parameters there, which no later save
    or session removed. The next save removes those in the checkpoint folder; the next session claiming the run
    directory those in either folder, and no other file."""
    folder = tmp_path / "theirs"  # --out naming a user's folder of other files, no run's: nothing there is ours
    folder.mkdir()
    (folder / ".tmpAb12Cd").write_bytes(b"\0" * 64)
    with rundir.claimed(folder):
        assert (folder / ".tmpAb12Cd").exists()
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "config.toml").write_text("")
    left = [out / ".tmpAb12Cd", out / "checkpoint" / ".tmpZz9yX8"]
    for path in left:
        path.write_bytes(b"\0" * 64)
    kept = [out / ".tmp-notes", out / ".tmpfolder1", out / "tmpAb12Cd"]
    kept[0].write_text("a user's")
    kept[1].mkdir()
    kept[2].write_text("not hidden")
    with rundir.claimed(out):
        assert not any(path.exists() for path in left)
        assert all(path.exists() for path in kept)
    stray = out / "checkpoint" / ".tmpQq1wE2"
    stray.write_bytes(b"\0" * 64)
    ckpt.save(out / "checkpoint", [Shard(0, 0, torch.zeros(2), SGD(lr=1.0)).snapshot()], {"step": 1})
    assert sorted(path.name for path in (out / "checkpoint").iterdir()) == ["params-00000000.safetensors", "state.json"]
