"""The arithmetic of training (`tlray.train.steps`), without Ray, on a tiny timm model."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from tlray.config import OptimConfig
from tlray.data.preprocess import to_model_input
from tlray.model.build import build_model
from tlray.train.steps import evaluate, make_optimizer, train_step

NO_AMP = torch.autocast("cuda", enabled=False)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model, minfo = build_model("test_efficientnet", 3, in_chans=1, img_size=16, weights="none")
    feed = functools.partial(to_model_input, mean=minfo.data_config["mean"],
                             std=minfo.data_config["std"], size=(16, 16))
    images = torch.randint(0, 256, (24, 12, 12, 1), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    labels = torch.arange(24) % 3
    return model, feed, images, labels


def step_fn(model, feed, lr=0.01, steps=12):
    optimizer, scheduler = make_optimizer(model, OptimConfig(lr=lr, warmup_epochs=0), epochs=1,
                                          steps_per_epoch=steps)
    return functools.partial(train_step, forward=model, criterion=torch.nn.CrossEntropyLoss(),
                             optimizer=optimizer, scheduler=scheduler, amp=NO_AMP,
                             feed=feed), optimizer


def test_train_steps_fit_a_batch_and_follow_the_schedule(tiny):
    model, feed, images, labels = tiny
    step, optimizer = step_fn(model, feed)
    losses, rates = [], []
    for n in range(1, 13):
        _, loss = step(images, labels, n)
        losses.append(loss.item())
        rates.append(optimizer.param_groups[0]["lr"])
    assert losses[-1] < losses[0] * 0.7  # it learns the batch
    assert rates[0] > rates[5] > rates[-1]  # cosine: the rate falls with the step count


def test_evaluate_equals_the_whole_split_computed_at_once(tiny):
    model, feed, images, labels = tiny
    ids = [f"row {i}" for i in range(24)]
    batches = [(images[i:i + 7], labels[i:i + 7], ids[i:i + 7]) for i in range(0, 24, 7)]
    model.train()
    result = evaluate(model, batches, 3, feed, NO_AMP, "cpu", keep=True)
    assert model.training  # put back as it was
    model.eval()
    with torch.no_grad():
        logits = model(feed(images))
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result.acc == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result.rows == 24 and result.confusion.sum() == 24
    got_ids, got_labels, probs = result.predictions
    assert got_ids == ids and got_labels.tolist() == labels.tolist()
    torch.testing.assert_close(torch.from_numpy(probs), logits.softmax(1), rtol=1e-5, atol=1e-6)
