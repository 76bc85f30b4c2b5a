import numpy as np
import pytest
import torch

from normmatters.optim import NormTrajectory


def test_round_trip(tmp_path):
    a, b = torch.randn(4, 3, 2), torch.randn(6, 5)
    traj = NormTrajectory()
    for _ in range(3):
        traj.append([a, b])
        a.mul_(0.9)
    path = traj.save(tmp_path / "norms.npz")
    back = NormTrajectory.load(path)
    assert len(back) == 3 and back.shapes == [(4, 3, 2), (6, 5)]
    for t in range(3):
        for x, y in zip(back.norms(t), traj.norms(t)):
            assert torch.equal(x, y)
    torch.testing.assert_close(back.norms(2)[0], (a / 0.9).flatten(1).norm(dim=1).double())
    assert not list(tmp_path.glob("*.tmp"))


def test_mismatch_errors(tmp_path):
    traj = NormTrajectory()
    traj.append([torch.randn(4, 3)])
    with pytest.raises(ValueError, match="the trajectory has 1 parameters, got 2"):
        traj.append([torch.randn(4, 3), torch.randn(2)])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(5, 3\) but the trajectory recorded \(4, 3\)"):
        traj.append([torch.randn(5, 3)])
    with pytest.raises(IndexError, match="step 4 requested, but the trajectory holds 1 steps"):
        traj.norms(4)
    with pytest.raises(ValueError, match="nothing recorded"):
        NormTrajectory().save(tmp_path / "x.npz")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        NormTrajectory.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz' is not a norm trajectory"):
        NormTrajectory.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, header=np.array('{"format": "something-else"}'))
    with pytest.raises(ValueError, match="expected 'normmatters.NormTrajectory/1'"):
        NormTrajectory.load(other)
