"""A run folder is a record: never destroyed, mixed or misdescribed (issue 13, probes 1-5 and the resume window).

A finished tiny run is trained once per module and copied into each test's folder (`cp -r runs/A F`).
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmlab.cli import main as cli_main
from vlmlab.config import ConfigError, check_model_sources, load_config, save_config
from vlmlab.run import load_run
from vlmlab.run.checkpoint import CHECKPOINT, MANIFEST_FILE, TRAINABLE_FILE, CheckpointError
from vlmlab.run.lock import LOCK_FILE, RunLocked, run_lock
from vlmlab.train.loop import train

SHORT = ["train.max_steps=4", "train.save_every=2", "train.log_every=1", "train.eval_every=4", "train.eval_batches=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_config):
    """(folder of a finished 4-step run A, a function making configs over the same world and cache)."""
    root = tmp_path_factory.mktemp("safety")
    old = os.environ.get("VLMLAB_CACHE")
    os.environ["VLMLAB_CACHE"] = str(root / "cache")

    def config(out, *extra):
        return tiny_config(root, *SHORT, f"train.output_dir={out}", *extra)

    train(config(root / "A"))
    yield root / "A", config
    if old is None:
        os.environ.pop("VLMLAB_CACHE", None)
    else:
        os.environ["VLMLAB_CACHE"] = old


def _snapshot(folder):
    """Every file under a folder -> SHA-1 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _copy(finished, tmp_path, name="F"):
    run = tmp_path / name
    shutil.copytree(finished[0], run)
    return run


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _an_image(run):
    cfg = load_config(run / "config.yaml")
    world = cfg.data.datasets[0].split(":", 1)[1]
    return str(sorted((__import__("pathlib").Path(world) / "images").glob("*.png"))[0])


# ---------------------------------------------------------------------------------------------- probes 1 and 3


@pytest.mark.parametrize(
    "change, key",
    [
        ("connector.type=meanpool", "connector.type"),
        ("train.batch_size=4", "train.batch_size"),
        ("connector.num_queries=2", "connector.num_queries"),
        ("lm.lora.r=4", "lm.lora.r"),
        ("train.lr=0.02", "train.lr"),
        ("train.seed=1", "train.seed"),
        ("data.prompt=A photo of", "data.prompt"),
    ],
)
def test_a_resume_with_another_setting_is_refused_and_changes_nothing(finished, tmp_path, change, key):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=rf"cannot resume .*{key}: recorded .*, now "):
        train(finished[1](run, "train.max_steps=6", change), resume=True)
    assert _snapshot(run) == before  # config.yaml, metrics and checkpoint as they were
    assert load_run(run).caption([_an_image(run)])[0] == load_run(finished[0]).caption([_an_image(run)])[0]


def test_a_resume_onto_another_dataset_of_the_same_size_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    other = f"data.datasets=[synthetic:{tmp_path / 'other-world'}]"  # same synthetic_images: same size
    with pytest.raises(
        ConfigError, match=r"data.datasets: recorded \['synthetic:.*'\], now \['synthetic:.*other-world'\]"
    ):
        train(finished[1](run, other), resume=True)
    assert _snapshot(run) == before


def test_a_resume_onto_changed_data_files_is_refused(finished, tmp_path):
    """The same config over edited annotation files: the checkpoint records what it trained on."""
    cfg = finished[1](tmp_path / "run", f"data.datasets=[synthetic:{tmp_path / 'world'}]")
    train(cfg)
    world = tmp_path / "world" / "dataset_synthetic.json"
    doc = json.loads(world.read_text())
    doc["images"][0]["sentences"][0]["raw"] = "an edited caption"
    doc["images"][0]["sentences"][1]["raw"] = ""  # and one the reader skips: the refused run logs nothing
    world.write_text(json.dumps(doc))
    before = _snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"train_pairs_sha1: recorded '[0-9a-f]+', now '[0-9a-f]+'"):
        train(
            finished[1](tmp_path / "run", f"data.datasets=[synthetic:{tmp_path / 'world'}]", "train.max_steps=6"),
            resume=True,
        )
    assert _snapshot(tmp_path / "run") == before  # skipped_inputs.log included: written once the run is valid


def test_resume_may_extend_the_run_and_change_the_logging_cadence(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    train(finished[1](run, "train.max_steps=6", "train.log_every=2", "train.eval_every=3"), resume=True)
    assert "resumed from" in capsys.readouterr().out
    cfg = load_config(run / "config.yaml")
    assert (cfg.train.max_steps, cfg.train.log_every, cfg.train.output_dir) == (6, 2, str(run))  # says what it is
    assert [r["step"] for r in _records(run) if "train_loss" in r] == [1, 2, 3, 4, 6]


def test_a_resume_below_the_checkpoint_step_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=r"train.max_steps = 2 is below the step of .*checkpoint \(4\)"):
        train(finished[1](run, "train.max_steps=2"), resume=True)
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------------- probe 2


def test_training_into_a_finished_run_without_resume_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    for extra in ([], ["connector.type=meanpool"]):
        with pytest.raises(
            ConfigError, match=r"already holds a run .*use --resume .*another train.output_dir.*--overwrite"
        ):
            train(finished[1](run, *extra))
        assert _snapshot(run) == before


def test_overwrite_removes_the_old_run_only_once_the_new_one_is_valid(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "eval.json").write_text("{}")  # an evaluation of the old run
    before = _snapshot(run)
    # a run that cannot start (a batch larger than the data) fails in setup: the old run is untouched
    with pytest.raises(ValueError, match="exceeds the"):
        train(finished[1](run, "train.batch_size=1000"), overwrite=True)
    assert _snapshot(run) == before
    train(finished[1](run, "connector.type=meanpool", "train.max_steps=2"), overwrite=True)
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert load_config(run / "config.yaml").connector.type == "meanpool"
    assert not (run / "eval.json").exists()
    assert max(r["step"] for r in _records(run)) == 2
    assert all(k.startswith("connector.") or "lora_" in k for k in load_run(run).trainable_state_dict())


def test_overwrite_refuses_a_folder_that_is_no_run(finished, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "metrics.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(ConfigError, match="does not look like a run folder"):
        train(finished[1](tmp_path / "notes"), overwrite=True)
    assert (tmp_path / "notes" / "metrics.jsonl").read_text() == '{"mine": 1}\n'


# ---------------------------------------------------------------------------------------------- a full disk


def _resume_under_file_size_limit(cfg, config_path, limit):
    """`vlmlab train CONFIG --resume` in a process whose files cannot grow past `limit` bytes (`ulimit -f`), with
    SIGXFSZ ignored: a write past the limit fails with EFBIG, as a write to a full disk fails, instead of a kill."""
    save_config(cfg, config_path)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "vlmlab.cli", "train", str(config_path), "--resume"],
        preexec_fn=limited,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _hidden_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def test_a_full_disk_during_resume_leaves_every_file_of_the_run_as_it_was(finished, tmp_path):
    """(ulimit -f 1; vlmlab train CFG --resume): config.yaml is larger than 1 KiB, so its rewrite fails, and the
    config.yaml before it stays whole: the run still loads and resumes."""
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    assert (run / "config.yaml").stat().st_size > 1024
    done = _resume_under_file_size_limit(finished[1](run, "train.max_steps=8"), tmp_path / "resume.yaml", 1024)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("error") == done.stderr.count("vlmlab train: error: File too large: ") == 1  # one line
    assert _snapshot(run) == before  # config.yaml included: not cut to 1024 bytes
    assert _hidden_files(run) == []  # no temporary file left behind
    load_run(run)
    assert cli_main(["caption", str(run), _an_image(run)]) == 0


def test_a_full_disk_at_a_checkpoint_keeps_the_last_checkpoint_and_the_run_resumes(finished, tmp_path):
    """A limit the small files fit under and the weights do not: the new checkpoint fails, checkpoint/ stays the
    step-4 one, no checkpoint.tmp/ is left, the log's earlier lines are kept, and a resume finishes the run."""
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    checkpoint = {k: v for k, v in before.items() if k.startswith(CHECKPOINT + "/")}
    small = max((run / name).stat().st_size for name in ("config.yaml", "model_info.json", "metrics.jsonl"))
    limit = 2 * small + 8192  # room for the rewritten config and the log's new lines
    assert limit < (run / CHECKPOINT / TRAINABLE_FILE).stat().st_size
    old_log = (run / "metrics.jsonl").read_text()
    done = _resume_under_file_size_limit(finished[1](run, "train.max_steps=8"), tmp_path / "resume.yaml", limit)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("error") == done.stderr.count("vlmlab train: error: File too large: ") == 1  # one line
    assert {k: v for k, v in _snapshot(run).items() if k.startswith(CHECKPOINT + "/")} == checkpoint
    assert not (run / (CHECKPOINT + ".tmp")).exists() and _hidden_files(run) == []
    assert (run / "metrics.jsonl").read_text().startswith(old_log)
    _records(run)  # every line whole
    train(finished[1](run, "train.max_steps=8"), resume=True)
    assert max(r["step"] for r in _records(run)) == 8


# ---------------------------------------------------------------------------------------------- probe 4


def test_a_second_writer_is_refused_naming_the_holder(finished, tmp_path):
    run = _copy(finished, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from vlmlab.run.lock import run_lock\n"
            f"with run_lock({str(run)!r}, 'vlmlab train holder.yaml'):\n"
            "    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        with pytest.raises(RunLocked, match=rf"pid {holder.pid} on .*`vlmlab train holder.yaml`, started "):
            train(finished[1](run, "train.max_steps=6"), resume=True)
        assert {k: v for k, v in _snapshot(run).items() if k != LOCK_FILE} == {
            k: v for k, v in before.items() if k != LOCK_FILE
        }
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing its lock file: the next writer takes it over and says so
    assert (run / LOCK_FILE).exists()
    with run_lock(run, "next") as info:
        assert info["pid"] == os.getpid()
    assert not (run / LOCK_FILE).exists()


def test_the_cli_reports_a_locked_folder_in_one_line(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (tmp_path / "c.yaml").write_text((run / "config.yaml").read_text())
    with run_lock(run, "vlmlab train other.yaml"):
        args = ["train", str(tmp_path / "c.yaml"), "--resume", "--set", "train.max_steps=6", "--output-dir", str(run)]
        assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert f"is being written by pid {os.getpid()}" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["eval"], ["captions"], ["inspect", "x.png"]])
def test_commands_that_write_into_a_run_folder_take_its_lock(finished, capsys, command):
    with run_lock(finished[0], "vlmlab train a.yaml"):
        assert cli_main([command[0], str(finished[0]), *command[1:]]) == 2
    assert f"is being written by pid {os.getpid()}" in capsys.readouterr().err


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LOCK_FILE).write_text(
        json.dumps({"pid": dead.pid, "host": "h", "command": "vlmlab train x.yaml", "started": "then"})
    )
    with run_lock(tmp_path / "r"):
        pass
    out = capsys.readouterr().out
    assert f"taking over the lock left by pid {dead.pid} on h (`vlmlab train x.yaml`" in out


# ---------------------------------------------------------------------------------------------- probe 5


def _nan_weights(run):
    weights = run / CHECKPOINT / TRAINABLE_FILE
    state = load_file(weights)
    state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    save_file(state, weights)


def test_deleting_the_manifest_does_not_switch_integrity_checks_off(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    _nan_weights(run)
    (run / CHECKPOINT / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"no {MANIFEST_FILE}; a finished checkpoint always has one"):
        load_run(run)
    assert cli_main(["caption", str(run), _an_image(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and MANIFEST_FILE in captured.err
    with pytest.raises(CheckpointError, match=MANIFEST_FILE):
        train(finished[1](run, "train.max_steps=6"), resume=True)


def test_a_weights_file_the_manifest_does_not_list_is_refused(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    weights = run / CHECKPOINT / TRAINABLE_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # the tensor bytes changed: safetensors itself loads them
    weights.write_bytes(bytes(data))
    manifest = json.loads((run / CHECKPOINT / MANIFEST_FILE).read_text())
    del manifest["files"][TRAINABLE_FILE]  # ... and their line edited out of the manifest
    (run / CHECKPOINT / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"{TRAINABLE_FILE}: not listed in {MANIFEST_FILE}"):
        load_run(run)
    assert cli_main(["caption", str(run), _an_image(run)]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert captured.out == "" and error.startswith("vlmlab caption: error: ") and TRAINABLE_FILE in error
    with pytest.raises(CheckpointError, match=TRAINABLE_FILE):
        train(finished[1](run, "train.max_steps=6"), resume=True)


def test_an_extra_file_in_a_checkpoint_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.copy(run / CHECKPOINT / TRAINABLE_FILE, run / CHECKPOINT / "adapter.safetensors")
    with pytest.raises(CheckpointError, match=rf"adapter.safetensors: not listed in {MANIFEST_FILE}"):
        load_run(run)


def test_a_manifest_step_edited_to_another_is_refused(finished, tmp_path):
    """The step decides whether a run is finished (a chain reuses a finished stage): the manifest's must be that of
    the weights it lists (their safetensors header, which its SHA-256 covers)."""
    run = _copy(finished, tmp_path)
    manifest = json.loads((run / CHECKPOINT / MANIFEST_FILE).read_text())
    manifest["step"] = 400
    (run / CHECKPOINT / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="step 400.*step 4"):
        load_run(run)


def test_nan_weights_with_a_matching_manifest_are_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    _nan_weights(run)
    manifest = json.loads((run / CHECKPOINT / MANIFEST_FILE).read_text())
    manifest["files"][TRAINABLE_FILE] = hashlib.sha256((run / CHECKPOINT / TRAINABLE_FILE).read_bytes()).hexdigest()
    (run / CHECKPOINT / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="NaN/inf"):
        load_run(run)


# ---------------------------------------------------------------------------------------------- the log after a resume


def test_the_first_loss_logged_after_a_resume_averages_the_uninterrupted_window(finished, tmp_path, monkeypatch):
    import vlmlab.train.loop as loop

    extra = ["train.max_steps=6", "train.log_every=3", "train.save_every=2", "train.eval_every=6"]
    reference = train(finished[1](tmp_path / "ref", *extra))
    original = loop.save_checkpoint

    def save_then_die(run_dir, model, optimizer, scheduler, step, data_state):
        original(run_dir, model, optimizer, scheduler, step, data_state)
        if step == 2:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(finished[1](tmp_path / "run", *extra))
    monkeypatch.setattr(loop, "save_checkpoint", original)
    train(finished[1](tmp_path / "run", *extra), resume=True)

    def losses(run):
        return [(r["step"], r["train_loss"]) for r in _records(run) if "train_loss" in r]

    got, want = losses(tmp_path / "run"), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == [3, 6]
    for (step, a), (_, b) in zip(got, want):  # step 3 averages steps 1-3, two of them before the interruption
        assert a == pytest.approx(b, rel=1e-6), f"train_loss at step {step}: {a} after a resume, {b} uninterrupted"


def test_captions_over_max_caption_tokens_are_counted_and_listed(finished, tmp_path, capsys):
    run = train(finished[1](tmp_path / "run", "data.max_caption_tokens=3", "train.max_steps=1"))
    out = capsys.readouterr().out
    cut = [line for line in (run / "skipped_inputs.log").read_text().splitlines() if line.startswith("cut captions")]
    assert cut and f"{len(cut)} of " in out and "longer than data.max_caption_tokens = 3" in out
    assert all("cut to 3" in line for line in cut)


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.lr=inf", r"train.lr = inf is impossible"),
        ("train.lora_lr=nan", r"train.lora_lr = nan is impossible"),
        ("train.seed=-1", r"train.seed = -1 is impossible"),
        ("train.output_dir=", r"train.output_dir is empty"),
        ("train.output_dir=~nosuchuser13/run", r"cannot expand '~nosuchuser13'"),
    ],
)
def test_impossible_settings_fail_at_load(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [setting])


def test_output_dir_under_home_is_expanded():
    assert load_config(None, ["train.output_dir=~/runs/x"]).train.output_dir == os.path.expanduser("~/runs/x")


def test_a_hash_in_a_set_value_is_text_not_a_comment():
    assert load_config(None, ["data.prompt=Picture #1 shows"]).data.prompt == "Picture #1 shows"
    assert load_config(None, ['data.prompt="quoted #2"']).data.prompt == "quoted #2"


@pytest.mark.parametrize("offline", [True, False])
def test_a_mistyped_model_name_fails_at_once_naming_the_key(monkeypatch, offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    cfg = load_config(None, ["lm.name=vlmlab-no-such-org/no-such-model-13"])
    started = time.time()
    with pytest.raises(ConfigError, match=r"lm.name = 'vlmlab-no-such-org/no-such-model-13': not a local directory"):
        check_model_sources(cfg)
    assert time.time() - started < 15
    with pytest.raises(ConfigError, match=r"vision.name = '/no/such/dir': no such directory"):
        check_model_sources(load_config(None, ["vision.name=hf:/no/such/dir"]))


def test_the_same_dataset_listed_twice_is_refused(tmp_path):
    from vlmlab.config import check_data_paths

    (tmp_path / "coco").mkdir()
    cfg = load_config(None, [f"data.datasets=[coco:{tmp_path / 'coco'}, coco:{tmp_path / 'coco'}/]"])
    with pytest.raises(ConfigError, match=r"data.datasets\[1\] = .* names the same data as data.datasets\[0\]"):
        check_data_paths(cfg)
