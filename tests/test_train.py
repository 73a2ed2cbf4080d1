"""fkd-train: the loop against the written-out reference, accumulation, resume, flags, CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from torch import nn

from fkd_shards import shards
from fkd_shards.batches.stream import BatchStream
from fkd_shards.common.distributed import DistEnv
from fkd_shards.train import loop
from fkd_shards.train.checkpoint import TrainState, build_scheduler
from fkd_shards.train.cli import main as train_main
from fkd_shards.train.config import build_parser, resolve
from fkd_shards.train.kd import kd_loss, lr_factor, parameter_groups, topk_correct
from tests.conftest import INPUT_SIZE
from tests.reference import reference_train


def _init_weights(tmp_path, model_name="resnet18", classes=4):
    torch.manual_seed(123)
    model = torchvision.models.get_model(model_name, num_classes=classes)
    path = str(tmp_path / f"init-{model_name}.pt")
    torch.save(model.state_dict(), path)
    return model, path


def _train(output, out_dir, *extra):
    argv = ["--shards", output, "--output-dir", str(out_dir), "-j", "0", "--device", "cpu", *extra]
    assert train_main(argv) == 0


def _weights(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pth.tar"), weights_only=True)["state_dict"]


@pytest.mark.parametrize("mix_type,steps", [("cutmix", 2), ("mixup", 1), ("none", 4)])
def test_loop_matches_written_out_reference_bit_for_bit(converted, tmp_path, mix_type, steps):
    output, samples, truth = converted(mix_type=mix_type, batch_size=8, epochs=2)  # 8, 8, 4 rows
    model, init = _init_weights(tmp_path)
    reference_train(model, truth.files, samples, truth, epochs=2, size=INPUT_SIZE, mix_type=mix_type,
                    temperature=3.0, steps=steps)
    _train(output, tmp_path / "run", "--init-weights", init, "--gradient-accumulation-steps", str(steps))
    ours = _weights(tmp_path / "run")
    expected = model.state_dict()
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


class TinyNet(nn.Module):
    """No batch norm, no dropout: accumulation must not change the update."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _step_with(stream_batch, steps, *flags):
    torch.manual_seed(0)
    model = TinyNet()
    cfg = _config(steps, *flags)
    optimizer = loop.build_optimizer(cfg, model)
    state = TrainState(model, model, optimizer, build_scheduler(cfg, optimizer, 0),
                       torch.amp.GradScaler("cpu", enabled=False), 0, 0.0)
    loop.train_step(state, stream_batch, cfg, loop.EpochTotals.zeros("cpu"))
    return model.state_dict()


def _config(steps, *flags):
    args = build_parser().parse_args(["--shards", "x", "--gradient-accumulation-steps", str(steps), "--device", "cpu",
                                      *flags])
    manifest = shards.Manifest(
        num_images=20, batch_size=8, num_classes=4, soft_label_width=4, epochs=3, input_size=16,
        mix_type="cutmix", fkd_seed=42, classes=list("abcd"), soft_label_dtype="float16", shards=[])
    return resolve(args, manifest, DistEnv())


def test_accumulation_gives_the_same_update_without_batch_norm(converted):
    output, _, _ = converted(batch_size=8)
    batch = next(iter(BatchStream(shards.ShardSet(output), workers=0)))
    one = _step_with(batch, 1)
    two = _step_with(batch, 2)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(one["fc.weight"], TinyNet().fc.weight)


def test_last_batch_loss_quirk_and_mean(converted):
    output, _, _ = converted(batch_size=8)
    last = list(BatchStream(shards.ShardSet(output), workers=0, end_epoch=1))[-1]  # 4 rows: one micro-batch at A=2
    assert last.batch_rows == 4
    sgd = ("--sgd", "-lr", "0.5", "--weight-decay", "0")  # the update is proportional to the gradient
    before = _step_with(last, 1, *sgd, "-lr", "0")
    one = _step_with(last, 1, *sgd)
    quirk = _step_with(last, 2, *sgd)  # the loss of its only micro-batch is divided by A=2
    mean = _step_with(last, 2, *sgd, "--last-batch-loss", "mean")
    for name in one:
        torch.testing.assert_close(one[name], mean[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(quirk[name] - before[name], (one[name] - before[name]) / 2,
                                   rtol=1e-4, atol=1e-6)


def test_resume_after_a_crash_equals_an_uninterrupted_run(converted, tmp_path, monkeypatch):
    output, _, _ = converted(batch_size=8, epochs=3)
    _, init = _init_weights(tmp_path)
    _train(output, tmp_path / "straight", "--init-weights", init, "--cos")
    real_step, calls = loop.train_step, []

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 * 2 + 2:  # epoch 1 done and checkpointed; batch 2 of epoch 2
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(output, tmp_path / "resumed", "--init-weights", init, "--cos")
    state = torch.load(tmp_path / "resumed" / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 2 and state["position"] == {"epoch": 2, "batch": 0}
    monkeypatch.setattr(loop, "train_step", real_step)
    _train(output, tmp_path / "resumed", "--init-weights", init, "--cos", "--resume", "auto")
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    lines = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [x["train/epoch"] for x in lines] == [0, 1, 2]
    assert lines == [json.loads(x) | {"train/images_per_s": y["train/images_per_s"]}
                     for x, y in zip(open(tmp_path / "straight" / "metrics.jsonl"), lines)]


def test_cli_end_to_end_writes_checkpoints_and_metrics(converted, tmp_path, relabel_case, capsys):
    output, samples, _ = converted(batch_size=8)
    val_dir = os.path.dirname(os.path.dirname(samples[0][0]))  # the train ImageFolder doubles as val
    out = tmp_path / "run"
    _train(output, out, "--val-dir", val_dir, "--val-every", "2", "--sgd", "-lr", "0.1", "-j", "2")
    printed = capsys.readouterr().out
    assert "B=8 = 1 rank(s) x 1 micro-batches x 8 rows" in printed
    assert f"decoded cache: {len(samples)} images" in printed  # the default (auto): a small set fits
    assert printed.count("TRAIN Iter") == 3 and printed.count("TEST Iter") == 2  # epochs 0 and 2
    state = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert {"epoch", "state_dict", "best_acc1", "optimizer", "scheduler"} <= state.keys()
    assert state["epoch"] == 3 and not any(k.startswith("module.") for k in state["state_dict"])
    assert os.path.exists(out / "model_best.pth.tar")
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["train/epoch"] for x in lines] == [0, 1, 2]
    assert [x["train/lr"] for x in lines] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3])
    assert {"train/loss", "train/Top1", "train/Top5", "val/loss", "val/top1", "val/top5", "val/epoch"} \
        <= lines[0].keys() and "val/top1" not in lines[1]
    assert 0 <= lines[2]["val/top1"] <= 100 and lines[2]["train/loss"] > 0


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "4"], "--batch-size 4 contradicts the shard set's B=6"),
    (["--mix-type", "mixup"], "--mix-type mixup contradicts the shard set's cutmix"),
    (["--fkd_seed", "1"], "--fkd_seed 1 contradicts the shard set's 42"),
    (["--epochs", "4"], "--epochs 4 asked, the shard set holds 3"),
    (["--gradient-accumulation-steps", "4"], "not divisible by --gradient-accumulation-steps 4"),
    (["--train-dir", "x", "--fkd-path", "y"], "run fkd-convert"),
    (["--model", "no_such_net"], "--model no_such_net is not a torchvision.models"),
    (["--model", "vit_b_16"], "--model vit_b_16 cannot take this set's 16x16 crops"),
    (["--model", "timm:no_such_net"], "timm"),
    (["--device", "tpu:0"], "--device 'tpu:0'"),
    (["--restart", "--resume", "auto"], "--restart and --resume contradict each other"),
    (["--resume", "missing.pth"], "--resume missing.pth: no such file"),
    (["--init-weights", "missing.pt"], "missing.pt: no such file"),
    (["--start-epoch", "3"], "--start-epoch 3 outside [0, 3)"),
    (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    (["--val-dir", "/nonexistent/val"], "/nonexistent/val: not a usable image folder"),
    (["--cache-labels"], "--cache-labels needs --cache-dir"),
])
def test_flag_conflicts_are_one_line_errors(converted, tmp_path, capsys, flags, message):
    output, _, _ = converted()
    argv = ["--shards", output, "--output-dir", str(tmp_path / "run"), "-j", "0", "--device", "cpu", *flags]
    assert train_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth.tar")


def test_resume_refuses_a_checkpoint_of_another_shard_set(converted, tmp_path, capsys):
    a, _, _ = converted(name="a")
    b, _, _ = converted(name="b", batch_size=4)
    _train(a, tmp_path / "run", "--epochs", "1")
    argv = ["--shards", b, "--output-dir", str(tmp_path / "run"), "-j", "0", "--resume", "auto"]
    assert train_main(argv) == 1
    assert "written for another shard set" in capsys.readouterr().err


def test_init_weights_refuses_unsafe_pickles(converted, tmp_path, capsys):
    output, _, _ = converted()
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "obj": TinyNet}, path)
    assert train_main(["--shards", output, "--output-dir", str(tmp_path / "r"), "--init-weights",
                       str(path)]) == 1
    err = capsys.readouterr().err
    assert "needs unsafe unpickling of tests.test_train.TinyNet; refused" in err and len(err.splitlines()) == 1


def test_kd_loss_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    soft = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    t = 2.0
    total = 0.0
    for row in range(2):
        q = torch.softmax(soft[row] / t, 0)
        log_p = torch.log_softmax(logits[row] / t, 0)
        total += float((q * (q.log() - log_p)).sum())
    assert kd_loss(logits, soft, t).item() == pytest.approx(total / 2, rel=1e-6)


def test_schedule_groups_and_accuracy():
    assert [lr_factor(e, 4, False) for e in (0, 1, 4, 5)] == [1.0, 0.75, 0.0, 0.0]
    assert lr_factor(2, 4, True) == pytest.approx(0.5) and lr_factor(5, 4, True) == 0.0
    groups = parameter_groups(TinyNet(), 0.01)
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["weight_decay"] == 0.0
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    assert [int(c) for c in topk_correct(logits, torch.tensor([1, 2]), (1, 5))] == [1, 2]


def test_distributed_env_defaults():
    env = DistEnv()
    assert env.is_main and not env.active


def test_resume_from_a_bare_state_dict_is_a_clear_error(converted, tmp_path, capsys):
    output, _, _ = converted()
    _, init = _init_weights(tmp_path)
    argv = ["--shards", output, "--output-dir", str(tmp_path / "r"), "-j", "0", "--resume", init]
    assert train_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "not an fkd-train checkpoint (no epoch, state_dict, optimizer, scheduler, rng)" in err
    assert len(err.splitlines()) == 1


def test_wandb_online_without_a_key_is_a_one_line_error(converted, tmp_path, capsys, monkeypatch):
    output, _, _ = converted()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    argv = ["--shards", output, "--output-dir", str(tmp_path / "r"), "-j", "0", "--wandb-mode", "online"]
    assert train_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use --wandb-mode offline or disabled" in err, err


def test_wandb_offline_writes_a_local_run(converted, tmp_path):
    import subprocess
    import sys

    output, _, _ = converted()
    env = dict(os.environ, WANDB_DIR=str(tmp_path), HOME=str(tmp_path))
    env.pop("WANDB_API_KEY", None)
    # Its own process: wandb keeps process-wide state between runs.
    subprocess.run([sys.executable, "-m", "fkd_shards.train", "--shards", output, "--output-dir",
                    str(tmp_path / "run"), "-j", "0", "--epochs", "1", "--wandb-mode", "offline",
                    "--wandb-api-key", "not-a-key"],
                   env=env, check=True, capture_output=True, timeout=300)
    runs = [d for d in os.listdir(tmp_path / "run" / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and not os.path.exists(tmp_path / "wandb")  # under the output directory
    assert "not-a-key" not in open(tmp_path / "run" / "metrics.jsonl").read()
    for root, _, files in os.walk(tmp_path / "run" / "wandb"):
        for name in files:
            try:
                data = open(os.path.join(root, name), "rb").read()
            except FileNotFoundError:  # wandb's service may still be tidying its temporary files
                continue
            assert b"not-a-key" not in data, name


def test_device_crops_train_to_the_same_weights(converted, tmp_path):
    output, _, _ = converted(batch_size=8, epochs=1)
    _, init = _init_weights(tmp_path)
    _train(output, tmp_path / "pil", "--init-weights", init)
    _train(output, tmp_path / "device", "--init-weights", init, "--device-crops")
    pil, device = _weights(tmp_path / "pil"), _weights(tmp_path / "device")
    assert all(torch.equal(pil[k], device[k]) for k in pil)


READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("optimizer", [["--sgd"], []])
def test_a_training_step_reads_nothing_back_from_the_device(converted, monkeypatch, optimizer):
    """Inside a step no tensor value is read by the host (.item(), bool(), ...): on a GPU each read
    waits for the device. The loss check reads once every 10 batches, outside the step."""
    output, _, _ = converted(batch_size=8, epochs=1, per_class=10)
    shard_set = shards.ShardSet(output)
    cfg = resolve(build_parser().parse_args(["--shards", output, "--device", "cpu", *optimizer]), shard_set.manifest,
                  DistEnv())
    state = loop.build_state(cfg, shard_set.manifest)
    totals = loop.EpochTotals.zeros("cpu")
    reads, counting = [], [False]

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if counting[0] and not _step_counter(self, state.optimizer):
                reads.append(name)
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    steps = 0
    for batch in BatchStream(shard_set, workers=0):
        counting[0] = True
        loop.train_step(state, batch, cfg, totals, inputs=loop.step_inputs(batch, cfg))
        counting[0] = False
        steps += 1
    assert steps == 5 and reads == []


def _step_counter(tensor: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """AdamW's per-parameter step counters, which torch keeps on the host even for a GPU model
    (reading them waits for nothing)."""
    return any(tensor is kept.get("step") for kept in optimizer.state.values())


def test_precision_flags_are_set_and_recorded_and_the_timeout_is_bounded(converted, tmp_path, capsys):
    output, _, _ = converted(batch_size=8, epochs=1)
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    try:
        _train(output, tmp_path / "run", "--epochs", "1")
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        with open(tmp_path / "run" / "summary.json") as f:
            config = json.load(f)["config"]
        assert (config["tf32"], config["cudnn_benchmark"], config["dist_timeout"]) == (False, False, 120)
        _train(output, tmp_path / "tf32", "--epochs", "1", "--tf32", "--cudnn-benchmark")
        assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cudnn.benchmark is True
    finally:
        from fkd_shards.common.precision import set_precision

        set_precision(tf32=False, cudnn_benchmark=False)
    with pytest.raises(SystemExit) as exit_:
        train_main(["--shards", output, "--dist-timeout", "0"])
    assert exit_.value.code == 2
    assert "--dist-timeout: must be in [1, 10080], got 0" in capsys.readouterr().err
