"""Joint training on the tiny random Llama: the loss goes down, checkpoints load, crashes resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alphamath.model import VALUE_HEAD_FILE, ValueHeadModel
from tests.pipeline import make_tree
from trainer_svc.examples import Example, extract_examples
from trainer_svc.train import TrainConfig, lr_factor, plan, train

ROOT = Path(__file__).resolve().parent.parent


def examples(n_trees=3) -> list[Example]:
    out = []
    for i in range(n_trees):
        out += extract_examples(make_tree(f"q{i}", answers=("4", str(i + 5)), code_error_path=False))
    return out


def test_schedule_and_plan():
    assert [round(lr_factor(s, 2, 10), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cfg = TrainConfig(epochs=2, batch_size=2, grad_accum=2)
    steps = plan(5, cfg)
    assert len(steps) == 4  # 3 micro-batches per epoch -> 2 optimizer steps per epoch
    assert sorted(i for s in steps[:2] for mb in s for i in mb) == list(range(5))
    assert steps == plan(5, cfg) and steps != plan(5, TrainConfig(epochs=2, batch_size=2, grad_accum=2, seed=1))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0).validate()


def test_training_lowers_the_joint_loss_and_saves_a_loadable_checkpoint(tiny_model_dir, tmp_path):
    exs = examples()
    cfg = TrainConfig(epochs=5, learning_rate=3e-3, batch_size=6, warmup_ratio=0.0, value_loss_weight=1.0,
                      dtype="fp32")
    seen = []
    res = train(tiny_model_dir, exs, tmp_path / "ckpt", cfg, on_progress=seen.append)
    assert res.steps == 5 and [p.step for p in seen] == list(range(1, 6))
    assert seen[-1].loss < seen[0].loss * 0.8 and seen[-1].value_loss < seen[0].value_loss
    model = ValueHeadModel.from_pretrained(tmp_path / "ckpt", dtype="fp32")
    assert (tmp_path / "ckpt" / VALUE_HEAD_FILE).is_file() and model.tokenizer is not None
    assert model.value_head.weight.abs().sum() > 0  # the zero-initialised head learned something
    fit = json.loads((tmp_path / "ckpt" / "training.json").read_text())["value_fit"]
    assert fit["questions"] == 3 and fit["states"] == 9  # a shared code step + 2 answers per question
    assert fit["l2"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0) and fit["cv_constant_mse"] > 0 and fit["cv_mse"][str(fit["l2"])] == min(fit["cv_mse"].values())
    assert not (tmp_path / "ckpt.state").exists()
    again = train(tiny_model_dir, exs, tmp_path / "ckpt", cfg)  # finished: idempotent no-op
    assert again.steps == 5 and again.seconds == 0.0
    with pytest.raises(ValueError, match="no training examples"):
        train(tiny_model_dir, [], tmp_path / "x", cfg)


def test_bf16_autocast_trains(tiny_model_dir, tmp_path):
    res = train(tiny_model_dir, examples(1), tmp_path / "bf16",
                TrainConfig(epochs=1, batch_size=2, dtype="bf16"))
    assert res.steps == 1 and res.loss is not None and torch.isfinite(torch.tensor(res.loss))
    assert load_file(str(tmp_path / "bf16" / VALUE_HEAD_FILE))["weight"].dtype == torch.float32


def test_killed_training_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    exs = examples()
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in exs))
    args = ["--epochs", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--save-every", "2", "--dtype", "fp32"]
    cmd = [sys.executable, "-m", "trainer_svc.train", "--base", str(tiny_model_dir), "--examples", str(data)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALPHAMATH_FAULT_KILL_AT": "after_state_save:2"}
    killed = subprocess.run(cmd + ["--out", str(tmp_path / "resumed")] + args, env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "resumed.state").is_dir() and not (tmp_path / "resumed").exists()
    env.pop("ALPHAMATH_FAULT_KILL_AT")
    resumed = subprocess.run(cmd + ["--out", str(tmp_path / "resumed")] + args, env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 4" in resumed.stdout
    cfg = TrainConfig(epochs=2, batch_size=2, learning_rate=1e-3, save_every=2, dtype="fp32")
    train(tiny_model_dir, exs, tmp_path / "straight", cfg)
    a = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(load_file(str(tmp_path / "resumed" / VALUE_HEAD_FILE))["weight"],
                               load_file(str(tmp_path / "straight" / VALUE_HEAD_FILE))["weight"], rtol=0, atol=1e-6)


def test_job_mode_trains_the_next_round_from_the_database(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`python -m trainer_svc.train` with no arguments, configured as the Kubernetes Job is."""
    from trainer_svc.ingest import store_tree
    from trainer_svc.store import Store
    from trainer_svc.train import _main

    url = f"sqlite:///{tmp_path / 'trainer.db'}"
    for k, v in {"ALPHAMATH_DB_URL": url, "ALPHAMATH_CHECKPOINT_DIR": str(tmp_path / "ckpts"),
                 "ALPHAMATH_MODEL_DIR": str(tiny_model_dir), "ALPHAMATH_DEVICE": "cpu", "ALPHAMATH_DTYPE": "fp32",
                 "ALPHAMATH_TRAINER_BATCH_SIZE": "8", "ALPHAMATH_TRAINER_MAX_LEN": "256",
                 "ALPHAMATH_TRAINER_VALUE_HOLDOUT": "0"}.items():  # every tree trains
        monkeypatch.setenv(k, v)
    assert _main([]) == 2  # no trees ingested yet: a clear error, no candidate
    assert "no training examples for checkpoint 'embedded'" in capsys.readouterr().err
    store = Store(url)
    try:
        assert [c.id for c in store.checkpoints()] == ["embedded"] and store.latest_job().state == "failed"
        for i in range(2):  # trees built by the round-0 checkpoint, as the ingestor stores them
            store_tree(store, make_tree(f"q{i}", answers=("4", str(i + 5))), "embedded")
        n_examples = store.counts("embedded")["examples"]

        assert _main([]) == 0
        assert "trained candidate round-1-" in capsys.readouterr().out
        (cand,) = [c for c in store.checkpoints() if c.id != "embedded"]
        assert (cand.round, cand.parent, cand.trees, cand.examples, cand.promoted) == (1, "embedded", 2, n_examples,
                                                                                      False)
        assert Path(cand.path) == tmp_path / "ckpts" / cand.id and (Path(cand.path) / VALUE_HEAD_FILE).is_file()
        assert store.current_checkpoint().id == "embedded"  # recorded, not promoted: that is the gate's job
        assert store.checkpoint("embedded").path == str(tiny_model_dir)
        job = store.latest_job()
        assert (job.state, job.output_checkpoint, job.round, job.examples) == ("succeeded", cand.id, 1, n_examples)
        assert job.step == job.total_steps == 1 and job.loss is not None

        # a restarted Job pod trains the same candidate: it finds it finished (or resumes its state)
        assert _main([]) == 0
        assert "resumed from step 1" in capsys.readouterr().out
        assert sorted(c.id for c in store.checkpoints()) == sorted(["embedded", cand.id])

        # round 2: the policy trains on its base's trees, the head is refit on the lineage's
        store.promote(cand.id)
        store_tree(store, make_tree("q2", answers=("4", "7")), cand.id)
        assert _main([]) == 0
        (cand2,) = [c for c in store.checkpoints() if c.parent == cand.id]
        assert cand2.examples == store.counts(cand.id)["examples"]
        fit = json.loads((Path(cand2.path) / "training.json").read_text())["value_fit"]
        assert fit["questions"] == 3  # q2, and q0 and q1 from the round-0 checkpoint
    finally:
        store.close()
    assert _main(["--base", str(tiny_model_dir)]) == 2  # offline mode needs all three paths
    assert "go together" in capsys.readouterr().err


def test_the_head_is_refit_on_every_finished_path_not_the_capped_sample(tiny_model_dir, tmp_path):
    from trainer_svc.train import value_fit_examples

    t = make_tree("q0", answers=("4", "5", "6", "7", "8", "9"))  # 1 right, 5 wrong
    capped = extract_examples(t)
    assert sum(not e.correct for e in capped) == 4  # the training sample keeps 4 wrong paths
    every = value_fit_examples([t], TrainConfig(value_holdout=0.0))
    assert len(every) == 6 and value_fit_examples([t], TrainConfig(value_holdout=0.999999)) == []
    train(tiny_model_dir, capped, tmp_path / "c", TrainConfig(epochs=1, batch_size=8, max_len=256, dtype="fp32"),
          value_examples=every)
    fit = json.loads((tmp_path / "c" / "training.json").read_text())["value_fit"]
    assert fit["states"] == 7 and fit["questions"] == 1  # the code step and all six answers
