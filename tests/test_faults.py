"""Faults: what a run does with bad input, a non-finite step, a second writer, a kill or an interrupt.

1. Validate first: bad input exits 2 with one stderr line naming the culprit, before anything is written.
2. Never save a broken model: non-finite steps are skipped and counted; --max-bad-steps in a row stop the stage
   (exit 1) and leave the previous checkpoint as it was.
3. One writer per output folder: OUT_DIR/.lock, held with flock for the whole run; a stale file does not block.
4. Crash-consistent saves: every run recovers the states a kill can leave between the renames of a save.
5. Exact resume: a run SIGKILLed at a random step and restarted with --resume ends byte-identical to an
   uninterrupted one (model.safetensors, metrics.jsonl apart from "elapsed").
6. SIGINT: exit 130 after the current step, one stderr line, a state that --resume completes to the same bytes.

Tiny models (1 layer, width 32), a small data dir, one thread; the kill tests run posttrain.py as a subprocess.
"""

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import posttrain
from data import task
from data.tokenizer import Tokenizer
from model import GPT, GPTConfig
from test_offpolicy import small_data  # the shipped files cut to their first rows

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
TOK = Tokenizer(task.DATA_DIR)  # the built-in character-level tokenizer
SHAPE = ["--n-layer", "1", "--n-embd", "32"]  # only for from-scratch stages: with --init they are refused
CHEAP = ["--threads", "1", "--eval-problems", "0", "--max-new-tokens", "8", "--group-size", "2", "--eval-n", "1",
         "--eval-samples", "1"]


def tiny_folder(path, seed=0, n_layer=1):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=n_layer, n_embd=32, n_head=4, n_kv_head=2,
                    intermediate_size=96, max_seq_len=128)
    GPT(cfg).save_pretrained(path)
    TOK.save(path)
    return str(path)


def snapshot(root):
    """Every file under root (a folder or one file) -> its bytes, and every folder; OUT_DIR/.lock left out."""
    root = str(root)
    if os.path.isfile(root):
        return {"": read_bytes(root)}
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        files[rel + "/"] = None
        for name in filenames:
            if rel == "." and name == ".lock":
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                files[os.path.join(rel, name)] = f.read()
    return files


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def metrics_without_timing(folder):
    """metrics.jsonl's records, minus "elapsed", as sorted-key JSON strings (NaN compares equal to NaN)."""
    out = []
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                rec.pop("elapsed", None)
                out.append(json.dumps(rec, sort_keys=True))
    return out


def lock_is_free(out_dir):
    """Whether OUT_DIR/.lock can be taken right now (taken and released at once if so)."""
    with open(os.path.join(out_dir, ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def run_main(argv):
    """posttrain.main in-process; its exit code (0 when it returns)."""
    try:
        posttrain.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def cli(argv):
    return [sys.executable, os.path.join(ROOT, "posttrain.py"), *argv]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(argv, timeout=300):
    return subprocess.run(cli(argv), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("init") / "tiny")


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A reward model with a random (nonzero) score head, for grpo --reward rm: a tiny random policy is never
    right, so the verifier's rewards would all be 0 and every update a no-op; the RM's scores differ."""
    folder = tmp_path_factory.mktemp("scorer") / "rm"
    torch.manual_seed(5)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                          intermediate_size=96, max_seq_len=128, score_head=True))
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    TOK.save(folder)
    (folder / "eval.json").write_text("{}")
    return str(folder)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    """An OUT_DIR holding pretrain and sft from short real runs (copy it before changing anything)."""
    out = str(tmp_path_factory.mktemp("built"))
    code = run_main(["--stage", "pretrain,sft", "--out-dir", out, "--data-dir", data, "--steps", "2",
                     "--batch-size", "4", "--no-pipeline-eval", *SHAPE, *CHEAP])
    assert code == 0
    for s in ("pretrain", "sft"):
        assert os.path.exists(os.path.join(out, s, "eval.json")), s
    return out


@pytest.fixture
def out_with_sft(tmp_path, built):
    """A fresh OUT_DIR with a good sft checkpoint in it (and nothing else)."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(os.path.join(built, "sft"), out / "sft")
    return str(out)


# ===========================================================================================================
# 1. validate first


def _empty_sft(data, init, tmp):
    open(os.path.join(data, "sft.jsonl"), "w").close()
    return {}, [os.path.join(data, "sft.jsonl")]


def _malformed_sft(data, init, tmp):
    path = os.path.join(data, "sft.jsonl")
    with open(path) as f:
        lines = f.readlines()[:2]
    with open(path, "w") as f:
        f.writelines(lines + ['{"prompt": "1+2=", "completion": \n'])  # line 3: cut off mid-object
    return {}, [f"{path}:3"]


def _truncated_weights(data, init, tmp):
    path = os.path.join(init, "model.safetensors")
    blob = read_bytes(path)
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])
    return {}, [path]


def _missing_config(data, init, tmp):
    os.remove(os.path.join(init, "config.json"))
    return {}, [(init, "config.json")]


def _fewer_layers(data, init, tmp):
    # config.json says 2 layers, model.safetensors holds 1
    shutil.rmtree(init)
    tiny_folder(init, n_layer=2)
    one = tiny_folder(os.path.join(tmp, "one_layer"), n_layer=1)
    shutil.copy(os.path.join(one, "model.safetensors"), os.path.join(init, "model.safetensors"))
    return {}, [init]


def _out_dir_is_a_file(data, init, tmp):
    path = os.path.join(tmp, "a_file")
    with open(path, "w") as f:
        f.write("not a folder\n")
    return {"out": path}, ["--out-dir", path]


def _eval_out_in_missing_folder(data, init, tmp):
    path = os.path.join(tmp, "no", "such", "folder", "eval.json")
    return {"extra": ["--eval-out", path]}, ["--eval-out", os.path.dirname(path)]


# (id, argv after the common flags, culprits (any one must be in the line; a tuple: all of its strings) or a
# setup function returning them)
# "{init}" in an argv is the tiny init folder; a setup function may change the data dir, the init, or OUT_DIR
REFUSED = [
    ("steps-0", ["--stage", "sft", "--init", "{init}", "--steps", "0"], ["--steps"]),
    ("steps-negative", ["--stage", "sft", "--init", "{init}", "--steps", "-5"], ["--steps"]),
    ("ppo-epochs-0", ["--stage", "grpo", "--init", "{init}", "--ppo-epochs", "0"], ["--ppo-epochs"]),
    ("lr-inf", ["--stage", "sft", "--init", "{init}", "--lr", "inf"], ["--lr"]),
    ("lr-nan", ["--stage", "sft", "--init", "{init}", "--lr", "nan"], ["--lr"]),
    ("lr-negative", ["--stage", "sft", "--init", "{init}", "--lr", "-1"], ["--lr"]),
    ("batch-size-0", ["--stage", "sft", "--init", "{init}", "--batch-size", "0"], ["--batch-size"]),
    ("micro-batch-size-0", ["--stage", "sft", "--init", "{init}", "--micro-batch-size", "0"],
     ["--micro-batch-size"]),
    ("group-size-0", ["--stage", "grpo", "--init", "{init}", "--group-size", "0"], ["--group-size"]),
    ("max-new-tokens-0", ["--stage", "grpo", "--init", "{init}", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("eval-n-0", ["--stage", "eval", "--eval-problems", "2", "--eval-n", "0"], ["--eval-n"]),
    ("eval-problems-negative", ["--stage", "sft", "--init", "{init}", "--eval-problems", "-1"],
     ["--eval-problems"]),
    ("temperature-negative", ["--stage", "sft", "--init", "{init}", "--temperature", "-1"], ["--temperature"]),
    ("stage-twice", ["--stage", "sft,sft", "--init", "{init}"], ["--stage"]),
    ("stage-empty", ["--stage", ""], ["--stage"]),
    ("stage-unknown", ["--stage", "nosuch"], ["--stage"]),
    ("shape-with-init", ["--stage", "sft", "--init", "{init}", "--n-layer", "2"], ["--n-layer"]),
    ("empty-data-file", ["--stage", "sft", "--init", "{init}"], _empty_sft),
    # validate first across a pipeline: pretrain would be written before sft reads its empty file
    ("empty-data-file-later-stage", ["--stage", "pretrain,sft", *SHAPE], _empty_sft),
    ("malformed-json-line", ["--stage", "sft", "--init", "{init}"], _malformed_sft),
    ("truncated-safetensors", ["--stage", "sft", "--init", "{init}"], _truncated_weights),
    ("missing-config", ["--stage", "sft", "--init", "{init}"], _missing_config),
    ("fewer-layers-than-config", ["--stage", "sft", "--init", "{init}"], _fewer_layers),
    ("out-dir-is-a-file", ["--stage", "sft", "--init", "{init}"], _out_dir_is_a_file),
    ("eval-out-missing-folder", ["--stage", "eval", "--eval-problems", "2"], _eval_out_in_missing_folder),
]


@pytest.mark.parametrize("argv,culprit", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, out_with_sft, data, refused, argv, culprit):
    data_dir = small_data(tmp_path / "case_data", n=32)
    init = tiny_folder(tmp_path / "case_init")
    out, extra = out_with_sft, []
    if callable(culprit):
        changes, culprit = culprit(data_dir, init, str(tmp_path))
        out, extra = changes.get("out", out), changes.get("extra", [])
    before, sft_before = snapshot(out), snapshot(out_with_sft)
    argv = [a.replace("{init}", init) for a in argv]
    # cheap settings first, so that a run which is wrongly not refused ends soon; the case's flags win
    err = refused("--out-dir", out, "--data-dir", data_dir, "--steps", "1", "--batch-size", "2", *CHEAP,
                  *argv, *extra)
    assert "Traceback" not in err
    # each entry of culprit: a string the line must hold, or a tuple of strings it must hold all of
    assert any(all(part in err for part in ((c,) if isinstance(c, str) else c)) for c in culprit), \
        f"the line names none of {culprit}: {err!r}"
    assert snapshot(out) == before  # nothing written, no new folder (an OUT_DIR/.lock aside)
    assert snapshot(out_with_sft) == sft_before  # the good checkpoint is byte-for-byte the same


def test_refused_run_creates_no_out_dir(tmp_path, init, refused):
    out = tmp_path / "fresh"
    err = refused("--stage", "sft", "--init", init, "--steps", "0", "--out-dir", str(out), *CHEAP)
    assert "--steps" in err
    assert not out.exists()


def test_refused_in_a_subprocess_has_no_traceback(tmp_path, out_with_sft, init):
    before = snapshot(out_with_sft)
    r = run_cli(["--stage", "sft", "--init", init, "--out-dir", out_with_sft, "--lr", "nan", *CHEAP])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "--lr" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert snapshot(out_with_sft) == before


def test_new_flags_have_their_documented_defaults():
    args = posttrain.get_args([])
    assert args.max_bad_steps == 3 and args.save_every == 50 and args.resume is False


# ===========================================================================================================
# 2. never save a broken model


class NanGrad(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poison_sft_loss(monkeypatch, bad_calls, kind="loss"):
    """Make the sft loss non-finite on the given call numbers (1-based; one call per step here, since the
    batch is one micro-batch). kind: "loss" (a NaN loss) or "grad" (a finite loss with a NaN gradient)."""
    original = posttrain.STAGES["sft"].loss
    calls = []

    def wrapper(ctx, args, mb):
        calls.append(1)
        loss, m = original(ctx, args, mb)
        if bad_calls(len(calls)):
            loss = loss * float("nan") if kind == "loss" else NanGrad.apply(loss)
        return loss, m

    monkeypatch.setattr(posttrain.STAGES["sft"], "loss", wrapper)
    return calls


def sft_argv(out, data, init, steps, *extra):
    return ["--stage", "sft", "--init", init, "--out-dir", out, "--data-dir", data, "--steps", str(steps),
            "--batch-size", "4", *CHEAP, *extra]


def test_consecutive_non_finite_steps_stop_the_stage_and_keep_the_old_checkpoint(
        tmp_path, out_with_sft, data, init, monkeypatch, capsys):
    before = snapshot(out_with_sft)
    calls = poison_sft_loss(monkeypatch, lambda n: n >= 2)  # NaN from step 2 on
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        posttrain.main(sft_argv(out_with_sft, data, init, 10))
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert err.count("\n") == 1 and "non-finite" in err, err
    assert len(calls) == 4  # step 1 good, steps 2, 3, 4 bad: the third in a row (default 3) stops it
    assert snapshot(out_with_sft) == before
    assert not os.path.exists(os.path.join(out_with_sft, "sft.tmp"))
    assert not os.path.exists(os.path.join(out_with_sft, "sft.old"))


def test_max_bad_steps_is_the_number_in_a_row(tmp_path, out_with_sft, data, init, monkeypatch, capsys):
    before = snapshot(out_with_sft)
    calls = poison_sft_loss(monkeypatch, lambda n: n >= 3)
    with pytest.raises(SystemExit) as e:
        posttrain.main(sft_argv(out_with_sft, data, init, 10, "--max-bad-steps", "1"))
    assert e.value.code == 1 and "non-finite" in capsys.readouterr().err
    assert len(calls) == 3
    assert snapshot(out_with_sft) == before


def last_record(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()][-1]


def all_finite(folder):
    return all(bool(torch.isfinite(p).all()) for p in GPT.from_pretrained(folder).parameters())


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_one_non_finite_step_is_skipped_and_the_run_completes(tmp_path, data, init, monkeypatch, kind):
    out = str(tmp_path / "out")
    poison_sft_loss(monkeypatch, lambda n: n == 3, kind=kind)
    assert run_main(sft_argv(out, data, init, 6)) == 0
    folder = os.path.join(out, "sft")
    assert all_finite(folder)  # without the skip, AdamW would have made every weight NaN
    rec = last_record(folder)
    assert rec["step"] == 6 and rec["skipped_steps"] == 1
    assert read_bytes(os.path.join(folder, "model.safetensors")) != read_bytes(os.path.join(init, "model.safetensors"))


def test_non_finite_steps_apart_do_not_stop_the_stage(tmp_path, data, init, monkeypatch):
    out = str(tmp_path / "out")
    poison_sft_loss(monkeypatch, lambda n: n in (2, 4, 6))  # three bad steps, never two in a row
    assert run_main(sft_argv(out, data, init, 7, "--max-bad-steps", "2")) == 0
    folder = os.path.join(out, "sft")
    assert all_finite(folder) and last_record(folder)["skipped_steps"] == 3


# ===========================================================================================================
# 3. one writer per output folder


def test_a_held_lock_refuses_a_second_run(tmp_path, out_with_sft, data, init):
    before = snapshot(out_with_sft)
    argv = sft_argv(out_with_sft, data, init, 1)
    with open(os.path.join(out_with_sft, ".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_cli(argv)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr
        assert "locked" in r.stderr or out_with_sft in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert snapshot(out_with_sft) == before
        fcntl.flock(held, fcntl.LOCK_UN)
    assert run_main(argv) == 0  # released: the same run proceeds
    assert snapshot(out_with_sft) != before
    assert lock_is_free(out_with_sft)  # and an in-process run lets go of it when it returns


def test_a_stale_lock_file_does_not_block(tmp_path, data, init):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("12345\n")  # left by a killed run: a file nobody holds
    assert run_main(sft_argv(str(out), data, init, 1)) == 0
    assert (out / "sft" / "model.safetensors").exists()


def test_a_refused_run_releases_the_lock(tmp_path, out_with_sft, init, refused):
    refused("--stage", "sft", "--init", init, "--out-dir", out_with_sft, "--steps", "0", *CHEAP)
    assert lock_is_free(out_with_sft)


# ===========================================================================================================
# 4. crash-consistent saves


def copy_built(built, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(built, out)
    if os.path.exists(os.path.join(out, ".lock")):
        os.remove(os.path.join(out, ".lock"))
    return out


def kill_between_renames(out, stage="sft"):
    """The state a kill leaves after `stage` -> `stage`.old and before `stage`.tmp -> `stage`: the .tmp is
    complete, and (so that it can be told from the .old) its eval.json says so."""
    folder = os.path.join(out, stage)
    os.rename(folder, folder + ".old")
    shutil.copytree(folder + ".old", folder + ".tmp")
    with open(os.path.join(folder + ".tmp", "eval.json")) as f:
        ev = json.load(f)
    ev["marker"] = "the new one"
    with open(os.path.join(folder + ".tmp", "eval.json"), "w") as f:
        json.dump(ev, f)
    return read_bytes(os.path.join(folder + ".tmp", "eval.json"))


def test_kill_between_the_renames_recovers_the_new_folder_on_the_default_path(tmp_path, built, data):
    out = copy_built(built, tmp_path)
    weights = {s: read_bytes(os.path.join(out, s, "model.safetensors")) for s in ("pretrain", "sft")}
    new_eval = kill_between_renames(out)
    # --no-dynamic-sampling: a tiny model is never right, and a step with every group dropped is no step
    code = run_main(["--stage", "grpo", "--steps", "1", "--batch-size", "2", "--out-dir", out, "--data-dir", data,
                     "--no-dynamic-sampling", *CHEAP])
    assert code == 0
    for s in ("pretrain", "sft"):  # neither was rebuilt
        assert read_bytes(os.path.join(out, s, "model.safetensors")) == weights[s], s
    assert read_bytes(os.path.join(out, "sft", "eval.json")) == new_eval  # sft came back from the .tmp
    assert os.path.exists(os.path.join(out, "grpo", "model.safetensors"))
    with open(os.path.join(out, "grpo", "args.json")) as f:
        assert os.path.normpath(json.load(f)["init"]) == os.path.normpath(os.path.join(out, "sft"))
    left = [n for n in os.listdir(out) if n.endswith((".old", ".tmp"))]
    assert not left, left


def eval_argv(out, data):
    return ["--stage", "eval", "--out-dir", out, "--data-dir", data, "--threads", "1", "--eval-problems", "2",
            "--eval-n", "1", "--max-new-tokens", "8"]


def eval_names(out):
    with open(os.path.join(out, "eval.json")) as f:
        return [r["name"] for r in json.load(f)["checkpoints"]]


def test_eval_after_a_kill_between_the_renames_finds_sft(tmp_path, built, data):
    out = copy_built(built, tmp_path)
    new_eval = kill_between_renames(out)
    assert run_main(eval_argv(out, data)) == 0
    assert "sft" in eval_names(out)
    assert read_bytes(os.path.join(out, "sft", "eval.json")) == new_eval
    assert not os.path.exists(os.path.join(out, "sft.old")) and not os.path.exists(os.path.join(out, "sft.tmp"))


@pytest.mark.parametrize("case", ["folder-and-old", "old-alone", "incomplete-tmp"])
def test_start_recovers_what_a_kill_leaves(tmp_path, built, data, case):
    out = copy_built(built, tmp_path)
    sft = os.path.join(out, "sft")
    good = snapshot(sft)
    if case == "folder-and-old":  # (b) killed after the second rename, before the .old was removed
        shutil.copytree(os.path.join(out, "pretrain"), sft + ".old")  # some other, older folder
    elif case == "old-alone":  # (c) killed after the first rename of a save whose .tmp was not complete
        os.rename(sft, sft + ".old")
    else:  # (d) killed while the .tmp was being written: no eval.json yet
        shutil.copytree(sft, sft + ".tmp")
        os.remove(os.path.join(sft + ".tmp", "eval.json"))
        with open(os.path.join(sft + ".tmp", "model.safetensors"), "r+b") as f:
            f.truncate(100)
    assert run_main(eval_argv(out, data)) == 0
    assert snapshot(sft) == good  # the good sft, in its place
    assert not os.path.exists(sft + ".old") and not os.path.exists(sft + ".tmp")
    assert "sft" in eval_names(out)


class Killed(BaseException):
    """A kill, simulated: not an Exception, so that nothing on the way up handles it."""


def test_a_save_killed_between_the_renames_leaves_a_complete_durable_tmp(tmp_path, out_with_sft, data, init,
                                                                          monkeypatch):
    out, old_sft = out_with_sft, snapshot(os.path.join(out_with_sft, "sft"))
    folder, tmp = os.path.join(out, "sft"), os.path.join(out, "sft.tmp")
    synced = []  # the paths os.fsync was called on, in order
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    early = []  # files of the .tmp made durable while an eval.json already marked it complete

    def fsync(fd):
        path = os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append(path)
        if os.path.dirname(path) == os.path.realpath(tmp) and os.path.basename(path) != "eval.json" and \
                os.path.exists(os.path.join(tmp, "eval.json")):
            early.append(os.path.basename(path))
        return real_fsync(fd)

    def moved(real):
        def move(src, dst, *a, **k):
            if os.path.realpath(src) == os.path.realpath(tmp) and os.path.realpath(dst) == os.path.realpath(folder):
                # the moment before the new folder takes its name: everything in it is on disk, eval.json last
                files = sorted(os.listdir(tmp))
                assert "eval.json" in files and "model.safetensors" in files, files
                in_tmp = [p for p in synced if os.path.dirname(p) == os.path.realpath(tmp)]
                missing = [f for f in files if os.path.join(os.path.realpath(tmp), f) not in in_tmp]
                assert not missing, f"not fsynced: {missing}"
                assert os.path.basename(in_tmp[-1]) == "eval.json", [os.path.basename(p) for p in in_tmp]
                assert not early, f"eval.json was there before {early} were on disk"
                raise Killed()
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", moved(real_rename))
    monkeypatch.setattr(os, "replace", moved(real_replace))
    with pytest.raises(Killed):
        posttrain.main(sft_argv(out, data, init, 2))
    monkeypatch.undo()
    assert not os.path.exists(folder)
    assert snapshot(folder + ".old") == old_sft  # the previous checkpoint, renamed aside
    new = snapshot(tmp)
    assert run_main(eval_argv(out, data)) == 0  # the next run puts the new one in place
    assert snapshot(folder) == new != old_sft
    assert not os.path.exists(folder + ".old") and not os.path.exists(tmp)


# ===========================================================================================================
# 5. exact resume, 6. SIGINT


def grpo_argv(out, data, init, *extra):
    # --reward rm (OUT_DIR/rm, the scorer fixture): rewards that differ within a group, so every step moves
    # the weights and the comparison of bytes means something
    return ["--stage", "grpo", "--init", init, "--out-dir", out, "--data-dir", data, "--steps", "8",
            "--save-every", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8",
            "--eval-problems", "2", "--eval-samples", "1", "--threads", "1", "--reward", "rm", *extra]


def sft_resume_argv(out, data, init, *extra):
    return ["--stage", "sft", "--init", init, "--out-dir", out, "--data-dir", data, "--steps", "20",
            "--save-every", "1", "--batch-size", "4", "--eval-problems", "2", "--eval-samples", "1",
            "--max-new-tokens", "8", "--threads", "1", *extra]


def new_out(path, scorer):
    """A fresh OUT_DIR holding the reward model grpo --reward rm reads."""
    os.makedirs(path)
    shutil.copytree(scorer, os.path.join(path, "rm"))
    return str(path)


def reference(out, make_argv, stage, data, init):
    r = run_cli(make_argv(out, data, init))
    assert r.returncode == 0, r.stderr[-3000:]
    folder = os.path.join(out, stage)
    assert not os.path.exists(os.path.join(out, stage + ".state")), "the state outlived the checkpoint"
    weights = read_bytes(os.path.join(folder, "model.safetensors"))
    assert weights != read_bytes(os.path.join(init, "model.safetensors")), "the reference run learned nothing"
    return weights, metrics_without_timing(folder)


@pytest.fixture(scope="module")
def grpo_ref(tmp_path_factory, data, init, scorer):
    return reference(new_out(tmp_path_factory.mktemp("ref") / "out", scorer), grpo_argv, "grpo", data, init)


@pytest.fixture(scope="module")
def sft_ref(tmp_path_factory, data, init, scorer):
    return reference(new_out(tmp_path_factory.mktemp("ref") / "out", scorer), sft_resume_argv, "sft", data, init)


def state_step(out, stage):
    """The "step" of OUT_DIR/<stage>.state/state.json, or None while it is missing or half visible."""
    try:
        with open(os.path.join(out, stage + ".state", "state.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_and_wait_for_state(argv, out, stage, k, timeout=120):
    """Popen the run, return (proc, step seen) once its state says step >= k; proc still running."""
    proc = subprocess.Popen(cli(argv), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        step = state_step(out, stage)
        if step is not None and step >= k:
            return proc, step
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    proc.kill()
    stdout, stderr = proc.communicate()
    pytest.fail(f"no {stage}.state with step >= {k} while the run was going (rc {proc.returncode}): "
                f"{stderr[-2000:]}")


def resume_and_compare(argv, out, stage, ref, why):
    r = run_cli([*argv, "--resume"])
    assert r.returncode == 0, f"{why}: {r.stderr[-3000:]}"
    folder = os.path.join(out, stage)
    weights, metrics = ref
    assert read_bytes(os.path.join(folder, "model.safetensors")) == weights, f"{why}: weights differ"
    assert metrics_without_timing(folder) == metrics, f"{why}: metrics.jsonl differs"
    assert not os.path.exists(os.path.join(out, stage + ".state")), f"{why}: the state outlived the checkpoint"
    return r


def kill_and_resume(tmp_path, make_argv, stage, data, init, ref, k, scorer):
    out = new_out(tmp_path / f"out_{stage}_{k}", scorer)
    argv = make_argv(out, data, init)
    proc, seen = start_and_wait_for_state(argv, out, stage, k)
    assert not lock_is_free(out), "the run does not hold OUT_DIR/.lock while it trains"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    why = f"{stage} killed at state step {seen} (k = {k})"
    assert proc.returncode == -signal.SIGKILL, f"{why}: the run ended before the kill"
    # the killed run's lock file is left behind, unheld: the resumed run must not be blocked by it
    resume_and_compare(argv, out, stage, ref, why)


@pytest.mark.parametrize("draw", [0, 1])
def test_grpo_killed_at_a_random_step_resumes_to_the_same_bytes(tmp_path, grpo_ref, data, init, scorer, draw):
    k = random.Random().randint(1, 6)
    kill_and_resume(tmp_path, grpo_argv, "grpo", data, init, grpo_ref, k, scorer)


def test_sft_killed_at_a_random_step_resumes_to_the_same_bytes(tmp_path, sft_ref, data, init, scorer):
    k = random.Random().randint(1, 10)
    kill_and_resume(tmp_path, sft_resume_argv, "sft", data, init, sft_ref, k, scorer)


def test_resume_without_a_state_starts_from_the_beginning(tmp_path, sft_ref, data, init):
    out = str(tmp_path / "out")
    r = resume_and_compare(sft_resume_argv(out, data, init), out, "sft", sft_ref, "--resume without a state")
    said = [line for line in (r.stdout + r.stderr).splitlines() if "resum" in line.lower() or "state" in line.lower()]
    assert said, "no line says that there is no state to resume from"


def test_sigint_stops_after_the_step_and_resumes_to_the_same_bytes(tmp_path, sft_ref, data, init):
    out = str(tmp_path / "out")
    argv = sft_resume_argv(out, data, init)
    proc, seen = start_and_wait_for_state(argv, out, "sft", 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr[-3000:]
    step = state_step(out, "sft")
    assert step is not None and seen <= step < 20, step  # a state of a finished step, not of the whole run
    assert lock_is_free(out)
    resume_and_compare(argv, out, "sft", sft_ref, f"sft interrupted at state step {seen}")
