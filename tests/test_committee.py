"""Bootstrap committees: trained on resamples, stored in the checkpoint, used by inference."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import select_args, train_args, write_digits_folder

from autolabel.cli import main
from connectors.errors import UsageError
from difficulty.checkpoint import load_checkpoint, save_checkpoint
from difficulty.committee import bootstrap_indices
from difficulty.inference import infer_arrays
from difficulty.strategies import consensus_entropy, vote_entropy
from difficulty.training import train_on_arrays


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:n].astype(np.float32) / 16.0, d.target[:n].astype(np.int64)


@pytest.fixture(scope="module")
def bagged() -> tuple:
    x, y = _digits(160)
    kwargs = dict(epochs=3, batch_size=32, seed=1, min_steps=0)
    ckpt = train_on_arrays(
        x, y, committee_kind="bootstrap", committee_size=3, committee_epochs=2, **kwargs
    )
    plain = train_on_arrays(x, y, **kwargs)
    return x, y, ckpt, plain


def test_bootstrap_indices_resample_with_replacement() -> None:
    a, b = bootstrap_indices(100, 0, seed=3), bootstrap_indices(100, 1, seed=3)
    assert a.shape == (100,) and a.min() >= 0 and a.max() < 100
    assert np.array_equal(a, bootstrap_indices(100, 0, seed=3))  # seeded
    assert len(np.unique(a)) < 100  # drawn with replacement: repeats, and items left out
    assert not np.array_equal(a, b)


def test_members_differ_from_each_other_and_leave_the_main_model_alone(bagged: tuple) -> None:
    _, _, ckpt, plain = bagged
    assert len(ckpt.committee) == 3
    assert ckpt.meta["committee"]["kind"] == "bootstrap" and ckpt.meta["committee"]["members"] == 3
    assert "committee" not in plain.meta and plain.committee is None
    for key, value in plain.state_dict.items():  # the main model is what it is without members
        assert torch.equal(ckpt.state_dict[key], value), key
    target = {k[len("target.") :]: v for k, v in ckpt.state_dict.items() if k.startswith("target.")}
    members = ckpt.committee
    assert set(members[0]) == set(target)
    for i, member in enumerate(members):
        assert any(not torch.equal(member[k], target[k]) for k in target), i
        for other in members[i + 1 :]:
            assert any(not torch.equal(member[k], other[k]) for k in target)


def test_infer_uses_the_stored_members(bagged: tuple, tmp_path: Path) -> None:
    x, _, ckpt, plain = bagged
    out = infer_arrays(ckpt, x[:40], committee=3, batch_size=16)
    assert out.committee.shape == (3, 40, 10)
    # each slice is that member's softmax, computed here by hand
    member = ckpt.build_model().target
    for m, state in enumerate(ckpt.committee):
        net = copy.deepcopy(member)
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            probs = torch.softmax(net(torch.as_tensor(x[:40]).unsqueeze(1)).logits, 1)
        np.testing.assert_allclose(out.committee[m], probs.double().numpy(), rtol=1e-5, atol=1e-6)
    again = infer_arrays(ckpt, x[:40], committee=3)
    np.testing.assert_array_equal(out.committee, again.committee)  # no sampling involved
    assert infer_arrays(ckpt, x[:40], committee=2).committee.shape == (2, 40, 10)
    assert infer_arrays(ckpt, x[:40], committee=8).committee.shape == (3, 40, 10)  # all stored
    assert infer_arrays(plain, x[:40], committee=4).committee.shape == (4, 40, 10)  # MC dropout
    for values in (vote_entropy(out.committee), consensus_entropy(out.committee)):
        assert values.shape == (40,) and np.all(np.isfinite(values)) and np.all(values >= 0)

    path = str(tmp_path / "bagged.pt")
    save_checkpoint(path, ckpt.model, ckpt.meta, committee=ckpt.committee)
    raw = torch.load(path, weights_only=True)
    assert len(raw["committee"]) == 3
    loaded = load_checkpoint(path)
    np.testing.assert_allclose(
        infer_arrays(loaded, x[:40], committee=3).committee, out.committee, rtol=1e-6
    )


def test_bootstrap_committee_settings_are_checked() -> None:
    x, y = _digits(40)
    with pytest.raises(UsageError, match="committee"):
        train_on_arrays(x, y, epochs=1, min_steps=0, committee_kind="bagging")
    with pytest.raises(UsageError, match="committee"):
        train_on_arrays(x, y, epochs=1, min_steps=0, committee_kind="bootstrap", committee_size=1)


def test_cli_trains_a_bootstrap_committee_that_select_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_digits_folder(tmp_path / "digits", 36, 24)
    ckpt = str(tmp_path / "bagged.pt")
    main(
        train_args(
            root,
            "imagefolder",
            "classification",
            ckpt,
            *("--epochs", "2", "--batch-size", "8", "--image-size", "16"),
            *("--calibration-share", "0", "--committee-kind", "bootstrap"),
            *("--committee-size", "2", "--committee-epochs", "1"),
        )
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["committee"]["kind"] == "bootstrap" and summary["committee"]["members"] == 2
    assert len(load_checkpoint(ckpt).committee) == 2
    out = tmp_path / "sel.csv"
    main(select_args(root, "imagefolder", "vote_entropy", 5, out, "--model", ckpt))
    assert json.loads(capsys.readouterr().out)["selected"] == 5
    with pytest.raises(SystemExit) as exc:  # detection has no bootstrap committee
        main(
            train_args(
                root,
                "imagefolder",
                "detection",
                tmp_path / "det.pt",
                "--committee-kind",
                "bootstrap",
            )
        )
    assert exc.value.code == 2 and "bootstrap committee" in capsys.readouterr().err
